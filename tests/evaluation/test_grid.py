"""The demo's comparison grid (evaluation/grid.py) on fake run folders."""

from __future__ import annotations

import json

from PIL import Image

from evaluation.grid import comparison, compose


def fake_run(root, name, private, colour, prompts=("an emoji of a cat", "an emoji of a dog")):
    run = root / name
    (run / "samples").mkdir(parents=True)
    for i, _ in enumerate(prompts):
        Image.new("RGB", (32, 32), "white").save(run / "samples" / f"base_{i:02d}.png")
        Image.new("RGB", (32, 32), colour).save(run / "samples" / f"adapted_{i:02d}.png")
    eps = {"prv": 0.99, "rdp": 1.2} if private else {"prv": float("inf"), "rdp": float("inf")}
    (run / "privacy.json").write_text(json.dumps({"private": private, "epsilon": eps}))
    (run / "run_config.json").write_text(json.dumps({"sample-prompts": "|".join(prompts)}))
    return run


def test_grid_has_a_base_row_and_one_row_per_run(tmp_path):
    dp = fake_run(tmp_path, "dp", True, "red")
    nonprivate = fake_run(tmp_path, "np", False, "blue")
    out = tmp_path / "grid" / "comparison.png"
    report = comparison([dp, nonprivate], out)
    assert report["rows"] == ["base model", "DPAgg-TI, eps = 0.99", "non-private TI (eps = inf)"]
    assert report["prompts"] == ["an emoji of a cat", "an emoji of a dog"]
    sheet = Image.open(out)
    assert sheet.size == (230 + 2 * 128, 28 + 3 * 128)
    # the DP row's first cell is red, the non-private row's blue, the base row white
    assert sheet.getpixel((230 + 64, 28 + 64)) == (255, 255, 255)
    assert sheet.getpixel((230 + 64, 28 + 128 + 64)) == (255, 0, 0)
    assert sheet.getpixel((230 + 64, 28 + 256 + 64)) == (0, 0, 255)
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == report["rows"]


def test_compose_pads_short_rows():
    sheet = compose([("a", [Image.new("RGB", (8, 8), "black")] * 3), ("b", [])], ["x", "y", "z"], cell=16, label_width=10)
    assert sheet.size == (10 + 3 * 16, 28 + 2 * 16)
