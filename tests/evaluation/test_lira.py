"""LiRA's likelihood ratio on synthetic statistics, and end to end on shadow LoRAs (slow)."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation import metrics
from evaluation.lira import lira_scores


def test_lira_scores_separate_members_when_in_and_out_differ():
    rng = np.random.default_rng(0)
    n, k = 200, 16
    difficulty = rng.normal(0, 3, n)  # per-image offsets that a global threshold cannot remove
    labels = np.r_[np.ones(n // 2), np.zeros(n // 2)].astype(int)
    inclusion = np.stack([rng.permutation(k) < k // 2 for _ in range(n)], axis=1)
    shadows = difficulty + inclusion * 1.0 + rng.normal(0, 0.3, (k, n))
    target = difficulty + labels * 1.0 + rng.normal(0, 0.3, n)
    online, offline = lira_scores(target, shadows, inclusion)
    assert metrics.auc(online, labels) > 0.9 and metrics.auc(offline, labels) > 0.9
    assert metrics.auc(target, labels) < 0.7  # the uncalibrated statistic is much weaker


def test_lira_needs_in_and_out_shadows_for_every_image():
    with pytest.raises(ValueError, match="one shadow with it and one without"):
        lira_scores(np.zeros(2), np.zeros((2, 2)), np.array([[True, True], [True, False]]))


@pytest.mark.slow
def test_lira_detects_the_overfit_adapter(overfit_run, overfit_split):
    """4 shadow LoRAs of the target's recipe (~8 min on 2 busy cores)."""
    from evaluation.attacks import run_attacks

    result = run_attacks(overfit_run, *overfit_split, attacks=["lira"], lira_shadows=4, progress=False)
    record = result["attacks"][0]
    # seen: online 0.78 [0.59, 0.94], offline 0.96 (each image in 2 shadows, out of 2)
    assert record["name"] == "lira" and record["auc_ci"][0] > 0.5, record["auc"]
    assert record["details"]["offline_auc"] > 0.75
