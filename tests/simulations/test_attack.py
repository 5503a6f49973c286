"""The attack command on a briefly trained LoRA run: attacks.json follows the contract."""

from __future__ import annotations

import json
import math

import pytest

from common.data import load_site_images
from common.paths import REPO_ROOT
from evaluation.fixtures import OverfitRecipe, overfit_lora_run
from simulations.attack import main

DEMO = REPO_ROOT / "data" / "demo"


@pytest.fixture(scope="module")
def brief_run(tmp_path_factory):
    """A rank-4 LoRA trained for 10 steps on site-0 of the demo data."""
    train = load_site_images(DEMO / "site-0", site="site-0", resolution=32)
    return overfit_lora_run(tmp_path_factory.mktemp("brief"), REPO_ROOT / "assets" / "emoji-sd", train, resolution=32,
                            recipe=OverfitRecipe(rank=4, steps=10, batch_size=4))


def test_attack_command_writes_the_contract(brief_run, capsys):
    out = brief_run / "attacks.json"
    main([str(brief_run), "--members", str(DEMO / "site-0"), "--non-members", str(DEMO / "site-2"), "-o", str(out),
          "--attacks", "loss-calibrated", "secmi-stat", "--draws", "1", "--no-progress"])
    result = json.loads(out.read_text())
    assert result["adapter"] == "lora" and (result["members"], result["non_members"]) == (12, 12)
    assert [r["name"] for r in result["attacks"]] == ["loss-calibrated", "secmi-stat"]
    site = result["site_inference"][0]  # one site each way: too few to say anything
    assert not site["applicable"] and "at least 2" in site["reason"] and site["auc"] is None
    for record in result["attacks"]:
        assert set(record) >= {"name", "applicable", "reason", "auc", "auc_ci", "balanced_accuracy", "tpr_at_fpr",
                               "epsilon_heuristic", "roc", "details"}
        assert record["applicable"] and 0 <= record["auc"] <= 1 and not math.isnan(record["epsilon_heuristic"])
        assert set(record["tpr_at_fpr"]) == {"0.01", "0.001"}
        assert record["roc"]["fpr"][0] == 0 and record["roc"]["tpr"][-1] == 1
    assert "loss-calibrated: AUC" in capsys.readouterr().out


def test_attack_command_names_bad_folders(brief_run, capsys):
    with pytest.raises(SystemExit):
        main([str(brief_run), "--members", str(DEMO / "nope"), "--non-members", str(DEMO / "site-2")])
    assert "does not exist" in capsys.readouterr().err
