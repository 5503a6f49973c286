"""simulations.evaluate end to end: a small real DPAgg-TI run on the emoji base (Flower
simulation), its utility figures and its report."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from common.paths import REPO_ROOT
from simulations.evaluate import evaluate
from tests.simulation_process import simulate

SMALL = {"model-path": str(REPO_ROOT / "assets" / "emoji-sd"), "resolution": 32, "ti-steps": 5, "sample-steps": 2,
         "sample-prompts": "an emoji of a cat|an emoji of a dog", "target-epsilon": 2.0}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    held = root / "held-out"
    held.mkdir()
    captions = json.loads((REPO_ROOT / "data" / "demo" / "site-3" / "captions.json").read_text())
    names = sorted(captions)[:4]
    for name in names:
        shutil.copyfile(REPO_ROOT / "data" / "demo" / "site-3" / name, held / name)
    (held / "captions.json").write_text(json.dumps({n: captions[n] for n in names}))
    out = simulate(2, {**SMALL, "output-dir": str(root / "run")})
    return out, held


def test_report_renders_from_a_small_real_run(small_run):
    run, held = small_run
    report = evaluate(run, held_out=held, attacks=False, draws=1, timesteps=(200, 600), sample_steps=2)
    text = report.read_text()
    ev = run / "evaluation"
    utility = json.loads((ev / "utility.json").read_text())
    privacy = json.loads((run / "privacy.json").read_text())
    d = utility["denoising_loss"]
    assert d["images"] == 4 and math.isfinite(d["base"]) and math.isfinite(d["adapted"]) and d["base"] > 0
    assert utility["distribution"]["reference_style"] == "noto"
    assert 0 <= utility["distribution"]["adapted"]["style_accuracy"] <= 1
    assert "**one image**" in text and f"{privacy['epsilon']['prv']:.3f}" in text
    assert "agrees with privacy.json" in text
    assert f"| denoising loss | {d['base']:.4f} | {d['adapted']:.4f} |" in text
    assert "Not run: skipped (--no-attacks)" in text
    audit = json.loads((ev / "audit.json").read_text())
    power = json.loads((ev / "audit_no_noise.json").read_text())
    # the audit's bound respects the accountant with the noise on, and grows with the noise off
    assert audit["epsilon_lower_bound"] <= privacy["epsilon"]["prv"]
    assert power["noise"] is False and power["epsilon_lower_bound"] > audit["epsilon_lower_bound"]
    assert f"{audit['canaries']} canaries" in text and "Power check" in text
    assert "Embedding cosine to a non-private run: not run" in text
    for png in ("grid.png", "epsilon_rounds.png"):
        assert (ev / png).is_file(), png


def test_missing_held_out_images_are_named(small_run, tmp_path):
    run, _ = small_run
    with pytest.raises(FileNotFoundError, match="--held-out folder not found"):
        evaluate(run, held_out=tmp_path / "nowhere", out=tmp_path / "ev", attacks=False)


def test_members_are_the_sites_that_took_part_and_never_the_held_out_folder(tmp_path):
    from common.config import RunConfig
    from evaluation.utility import Run
    from simulations.evaluate import attack_members

    data = REPO_ROOT / "data" / "demo"
    privacy = {"num_sites_declared": 2}  # a LoRA run declares K; data/demo holds 4 site folders
    (tmp_path / "privacy.json").write_text(json.dumps(privacy))
    lora = Run(path=tmp_path, config=RunConfig(adapter="lora", num_sites=4, data_path=str(data)), privacy=privacy, adapter="lora")
    assert attack_members(lora, data / "site-3") == [data / "site-0", data / "site-1"]
    with pytest.raises(ValueError, match="cannot serve as non-members"):
        attack_members(lora, data / "site-1")
    smp = Run(path=tmp_path, config=RunConfig(adapter="lora", num_sites=4, defense="smp-lora", data_path=str(data)), privacy={},
              adapter="lora")
    assert attack_members(smp, data / "site-3") is None  # its own member / non-member splits
