"""Rebuilding a run's member / non-member splits, and populations from image sets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from client.smp import split_members
from common.config import RunConfig
from common.paths import derive_seed
from evaluation.fixtures import take
from evaluation.splits import population, run_splits, site_folders
from tests.evaluation.conftest import DEMO


def write_run(tmp_path, **overrides):
    cfg = RunConfig(adapter="lora", num_sites=4, data_path=str(DEMO), resolution=32, seed=7, **overrides)
    (tmp_path / "run_config.json").write_text(json.dumps(cfg.to_run_config()))
    (tmp_path / "privacy.json").write_text(json.dumps({"num_sites": 2}))
    return cfg


def test_smp_run_splits_are_the_sites_own(tmp_path, demo_sites):
    write_run(tmp_path, defense="smp-lora")
    pop = run_splits(tmp_path)
    assert len(pop) == 24 and pop.labels.sum() == 12 and set(pop.sites) == {"site-0", "site-1"}
    # site-0's members are exactly the ones its client trained on
    splits = split_members(12, seed=derive_seed(7, "member-split", 0))
    expected = demo_sites[0].pixels[splits.members]
    rows = [i for i, s in enumerate(pop.sites) if s == "site-0" and pop.labels[i] == 1]
    got = pop.pixels[torch.tensor(rows)]
    assert sorted(map(float, got.sum((1, 2, 3)))) == pytest.approx(sorted(map(float, expected.sum((1, 2, 3)))))
    assert pop.aux.sum() == 12  # D^m_aux and D^nm_aux: half of each site's 6 + 6


@pytest.mark.parametrize("privacy", [{"num_sites": 2}, {"num_sites_declared": 2, "num_sites": None}])
def test_site_folders_are_the_runs_sites_only(tmp_path, privacy):
    """A TI run writes num_sites, a LoRA run num_sites_declared (K): either way the sites beyond
    the run's (data/demo has 4) are not members."""
    cfg = write_run(tmp_path)
    (tmp_path / "privacy.json").write_text(json.dumps(privacy))
    assert [f.name for f in site_folders(tmp_path, cfg)] == ["site-0", "site-1"]


def test_plain_run_needs_explicit_non_members(tmp_path):
    write_run(tmp_path, defense="none")
    with pytest.raises(ValueError, match="non-members"):
        run_splits(tmp_path)


def test_population_marks_half_of_each_class_aux(demo_sites):
    pop = population([demo_sites[0]], [take(demo_sites[1], 0, 6)], seed=1)
    assert (pop.labels == 1).sum() == 12 and (pop.labels == 0).sum() == 6
    assert pop.aux[pop.labels == 1].sum() == 6 and pop.aux[pop.labels == 0].sum() == 3
    assert np.array_equal(pop.subset(pop.labels == 0).labels, np.zeros(6))
    with pytest.raises(ValueError, match="at least one member"):
        population([], [demo_sites[1]])
