"""Metrics against brute force and known values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation import metrics


def brute_auc(s, y):
    pos, neg = s[y == 1], s[y == 0]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def test_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(1)
    s = rng.integers(0, 5, 60).astype(float)
    y = rng.integers(0, 2, 60)
    assert metrics.auc(s, y) == pytest.approx(brute_auc(s, y))
    # the area under the ROC's points (trapezoids) is the same number
    fpr, tpr, _ = metrics.roc_curve(s, y)
    assert np.trapezoid(tpr, fpr) == pytest.approx(brute_auc(s, y))
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)


def test_perfect_and_reversed_scores():
    y = np.r_[np.ones(50), np.zeros(50)]
    s = np.r_[np.arange(50) + 100.0, np.arange(50)]
    assert metrics.auc(s, y) == 1.0 and metrics.auc(-s, y) == 0.0
    assert metrics.balanced_accuracy(s, y) == 1.0
    tpr, ci = metrics.tpr_at_fpr(s, y, 0.01)
    assert tpr == 1.0 and ci[1] == 1.0 and ci[0] == pytest.approx(0.025 ** (1 / 50))
    # a test that is perfect either way round bounds epsilon equally
    assert metrics.epsilon_heuristic(s, y, 1e-5)[0] == pytest.approx(metrics.epsilon_heuristic(-s, y, 1e-5)[0])


def test_clopper_pearson_known_values():
    lo, hi = metrics.clopper_pearson(0, 10)
    assert lo == 0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
    lo, hi = metrics.clopper_pearson(5, 10)
    assert (lo, hi) == pytest.approx((0.1871, 0.8129), abs=1e-4)


def test_epsilon_from_rates():
    assert metrics.epsilon_from_rates(0.5, 0.05, 0.0) == pytest.approx(math.log(10))
    assert metrics.epsilon_from_rates(0.3, 0.3, 0.0) == 0.0
    assert metrics.epsilon_from_rates(0.0, 0.0, 0.0) == 0.0


def test_epsilon_heuristic_is_zero_for_a_blind_attack_and_grows_with_separation():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(300), np.zeros(300)]
    values = [metrics.epsilon_heuristic(np.r_[rng.normal(mu, 1, 300), rng.normal(0, 1, 300)], y, 1e-5)[0]
              for mu in (0.0, 2.0, 8.0)]
    assert values[0] == 0.0 and 0 < values[1] < values[2]


def test_summary_record_shape_and_bootstrap_ci():
    rng = np.random.default_rng(0)
    s, y = np.r_[rng.normal(1, 1, 100), rng.normal(0, 1, 100)], np.r_[np.ones(100), np.zeros(100)]
    rec = metrics.summarize("loss", s, y, delta=1e-5, resamples=200)
    assert rec["auc_ci"][0] < rec["auc"] < rec["auc_ci"][1]
    assert set(rec["tpr_at_fpr"]) == {"0.01", "0.001"}
    assert len(rec["roc"]["fpr"]) == len(rec["roc"]["tpr"])


@pytest.mark.parametrize("scores,labels,match", [
    ([1.0, 2.0], [1, 1], "one non-member"),
    ([1.0, float("nan")], [1, 0], "finite"),
    ([1.0, 2.0], [1, 2], "labels"),
    ([1.0], [1, 0], "differ in length"),
])
def test_bad_input_is_named(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        metrics.auc(scores, labels)


def test_the_heuristic_says_it_is_not_a_bound():
    """One run's scores are not independent trials: the figure is named and flagged a heuristic."""
    y = np.r_[np.ones(200), np.zeros(200)]
    record = metrics.summarize("loss", np.r_[np.arange(200) + 200.0, np.arange(200)], y, delta=1e-5, resamples=10)
    assert "epsilon_lower_bound" not in record and record["epsilon_heuristic"] > 0
    assert record["details"]["epsilon"]["valid_bound"] is False
    assert not hasattr(metrics, "epsilon_lower_bound")
