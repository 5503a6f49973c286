"""simulations.sweep: the data split, argument checks, and a minimal grid end to end (slow)."""

from __future__ import annotations

import json
import math

import pytest

from common.paths import REPO_ROOT
from simulations.sweep import main, parse_epsilons, parse_methods, plan, split_sites


def test_split_keeps_held_out_images_out_of_every_site(tmp_path):
    total = split_sites(REPO_ROOT / "data" / "demo", tmp_path / "data", num_sites=2, held_out_per_site=3)
    sites = [sorted(p.name for p in (tmp_path / "data" / f"site-{k}").glob("*.png")) for k in (0, 1)]
    held = sorted(p.name for p in (tmp_path / "data" / "held-out").glob("*.png"))
    assert total == 18 and [len(s) for s in sites] == [9, 9] and len(held) == 6
    assert not {n.split("-", 2)[-1] for n in held} & set(sites[0] + sites[1])
    assert set(json.loads((tmp_path / "data" / "held-out" / "captions.json").read_text())) == set(held)
    with pytest.raises(ValueError, match="too few"):
        split_sites(REPO_ROOT / "data" / "demo", tmp_path / "d2", num_sites=1, held_out_per_site=12)


def test_a_given_held_out_folder_is_used_and_the_sites_are_kept_whole(tmp_path):
    noto = REPO_ROOT / "data" / "noto"
    total = split_sites(noto, tmp_path / "data", num_sites=2, held_out_per_site=0, held_out=noto / "held-out")
    assert total == 200
    held = sorted(p.name for p in (tmp_path / "data" / "held-out").glob("*.png"))
    assert held == sorted(p.name for p in (noto / "held-out").glob("*.png"))
    captions = json.loads((tmp_path / "data" / "held-out" / "captions.json").read_text())
    assert captions == json.loads((noto / "held-out" / "captions.json").read_text())
    with pytest.raises(FileNotFoundError, match="--held-out"):
        split_sites(noto, tmp_path / "d2", num_sites=1, held_out_per_site=0, held_out=tmp_path / "missing")


def test_arguments_are_checked_and_inf_runs_first():
    assert parse_epsilons("0.5,1,inf") == [0.5, 1.0, math.inf]
    with pytest.raises(ValueError, match="not a number"):
        parse_epsilons("1,x")
    with pytest.raises(ValueError, match="unknown"):
        parse_methods("dpagg-ti,fancy")
    assert plan(["a"], [1.0, math.inf, 0.5]) == [("a", math.inf), ("a", 0.5), ("a", 1.0)]
    # a DP-SGD variant without privacy is the plain method: it runs at finite epsilons only
    assert plan(["dp-sgd-lora", "lora"], [math.inf, 1.0]) == [("dp-sgd-lora", 1.0), ("lora", math.inf), ("lora", 1.0)]


@pytest.mark.slow
def test_minimal_sweep_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    main(["--out", str(out), "--methods", "dpagg-ti", "--epsilons", "1,inf", "--num-sites", "2", "--no-attacks",
          "--draws", "1", "--sample-steps", "2", "--run-config",
          "ti-steps=5 sample-steps=2 sample-prompts='an emoji of a cat|an emoji of a dog'"])
    sweep = json.loads((out / "sweep.json").read_text())
    assert [(r["method"], r["target_epsilon"]) for r in sweep["runs"]] == [("dpagg-ti", "inf"), ("dpagg-ti", 1.0)]
    text = (out / "sweep_report.md").read_text()
    assert "| dpagg-ti | inf | inf |" in text and "| dpagg-ti | 1 | " in text
    for png in ("privacy_utility_loss.png", "privacy_utility_kid.png", "sweep_grid.png"):
        assert (out / png).is_file(), png
    assert "best membership-inference AUC: not run." in text
    # the private run's embedding is compared with the non-private one of the same sweep
    utility = json.loads((out / "runs" / "dpagg-ti-eps-1" / "evaluation" / "utility.json").read_text())
    assert -1 <= utility["embedding"]["cosine"] <= 1 and utility["embedding"]["reference_private"] is False
