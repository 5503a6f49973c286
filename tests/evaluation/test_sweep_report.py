"""The sweep report reads each run's privacy.json and evaluation files; nothing is filled in."""

from __future__ import annotations

import json

from PIL import Image

from evaluation.sweep_report import render_sweep_report


def fake_run(root, name: str, eps: float | None, change: float, colour: str) -> dict:
    run = root / name
    ev = run / "evaluation"
    ev.mkdir(parents=True)
    private = eps is not None
    (run / "privacy.json").write_text(json.dumps({"private": private, "epsilon": {"prv": eps, "rdp": eps}}))
    base = 0.2
    utility = {"adapter": "lora", "denoising_loss": {"base": base, "adapted": base * (1 + change),
                                                      "difference_ci": [base * change * 1.5, base * change * 0.5],
                                                      "relative_change": change},
               "distribution": {"base": {"kid": 0.05, "style_accuracy": 0.3},
                                "adapted": {"kid": 0.05 + change, "style_accuracy": 0.6}}}
    (ev / "utility.json").write_text(json.dumps(utility))
    sheet = Image.new("RGB", (64, 32), "white")
    sheet.paste(Image.new("RGB", (32, 16), colour), (0, 16))
    sheet.save(ev / "grid.png")
    return {"method": "lora", "target_epsilon": "inf" if eps is None else eps, "run": str(run), "evaluation": str(ev)}


def test_table_curves_and_grid(tmp_path):
    runs = [fake_run(tmp_path, "a", None, -0.05, "red"), fake_run(tmp_path, "b", 1.0, -0.01, "blue")]
    (tmp_path / "sweep.json").write_text(json.dumps({"runs": runs}))
    text = render_sweep_report(tmp_path).read_text()
    assert "| lora | inf | inf | -5.00% [-7.50%, -2.50%] | 50.00 -> 0.00 | 60% | not run | not run |" in text
    assert "| lora | 1 | 1.000 | -1.00% [-1.50%, -0.50%] | 50.00 -> 40.00 | 60% |" in text
    assert "best membership-inference AUC: not run." in text
    for png in ("privacy_utility_loss.png", "privacy_utility_kid.png", "sweep_grid.png"):
        assert Image.open(tmp_path / png).format == "PNG"


def test_the_strongest_attack_is_reported_with_its_intervals(tmp_path):
    run = fake_run(tmp_path, "a", 1.0, -0.01, "red")
    attacks = {"attacks": [
        {"name": "loss", "applicable": True, "auc": 0.61, "auc_ci": [0.55, 0.67],
         "tpr_at_fpr": {"0.01": {"tpr": 0.02, "ci": [0.0, 0.05]}}},
        {"name": "pia", "applicable": True, "auc": 0.72, "auc_ci": [0.66, 0.78],
         "tpr_at_fpr": {"0.01": {"tpr": 0.081, "ci": [0.04, 0.12]}}},
        {"name": "proxy-h", "applicable": False, "auc": None, "auc_ci": None, "tpr_at_fpr": None}]}
    (tmp_path / "a" / "evaluation" / "attacks.json").write_text(json.dumps(attacks))
    (tmp_path / "sweep.json").write_text(json.dumps({"runs": [run]}))
    text = render_sweep_report(tmp_path).read_text()
    assert "| pia 0.720 [0.660, 0.780] | 0.081 [0.040, 0.120] |" in text
