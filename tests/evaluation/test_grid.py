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


def test_the_kept_fractions_are_written_below_the_grid(tmp_path):
    from evaluation.grid import kept_lines

    kept = {"held_out_images": 216, "held_out_style": "noto",
            "measures": {"denoising_loss": {"kept": 0.91, "interval": [0.85, 0.97], "why_none": None},
                         "kid": {"kept": 0.88, "interval": None, "why_none": None},
                         "style_share": {"kept": None, "interval": None, "why_none": "the non-private run did not "
                                         "improve on the base (0.5 -> 0.49)"}}}
    lines = kept_lines(kept)
    assert lines[1] == "  held-out denoising loss: 0.91 (95% CI 0.85 to 0.97)"
    assert lines[2] == "  KID to held-out images: 0.88"
    assert lines[3].startswith("  share drawn in noto style: n/a: the non-private run did not improve")
    out = tmp_path / "comparison.png"
    comparison([fake_run(tmp_path, "dp", True, "red"), fake_run(tmp_path, "np", False, "blue")], out, kept=kept)
    width, height = Image.open(out).size
    assert (width, height) == (230 + 2 * 128, 28 + 3 * 128 + 22 * 4 + 8)
    # the footer holds dark text pixels, the plain grid has none there
    footer = Image.open(out).crop((0, 28 + 3 * 128, width, height)).convert("L")
    assert min(footer.getdata()) < 128


def test_the_grid_is_never_written_into_a_private_run_folder(tmp_path, capsys):
    import pytest

    from evaluation.grid import main

    dp, nonprivate = fake_run(tmp_path, "dp", True, "red"), fake_run(tmp_path, "np", False, "blue")
    with pytest.raises(SystemExit):
        main([str(dp), str(nonprivate), "--out", str(dp / "comparison.png")])
    assert "inside the private run's folder" in capsys.readouterr().err
    assert not (dp / "comparison.png").exists()
    main([str(dp), str(nonprivate), "--out", str(nonprivate / "comparison.png")])  # a non-private folder may hold it
    assert (nonprivate / "comparison.png").is_file()
