"""The one-run bound of Steinke, Nasr, Jagielski (2023) against closed forms."""

from __future__ import annotations

import math

import pytest

from evaluation.one_run import epsilon_lower_bound, p_value


def test_all_right_with_delta_zero_matches_the_closed_form():
    # P[Binomial(r, p) >= r] = p^r = beta  =>  p = beta^(1/r), eps = log(p / (1 - p))
    p = 0.05 ** (1 / 200)
    assert epsilon_lower_bound(1000, 200, 200, delta=0.0) == pytest.approx(math.log(p / (1 - p)), abs=1e-3)


def test_p_value_grows_with_epsilon_and_delta():
    values = [p_value(1000, 100, 80, eps, 1e-5) for eps in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values)
    assert p_value(1000, 100, 80, 1.0, 1e-3) > p_value(1000, 100, 80, 1.0, 0.0)


def test_chance_level_guessing_bounds_nothing_and_more_right_guesses_bound_more():
    assert epsilon_lower_bound(1000, 500, 250, delta=1e-5) == 0.0
    bounds = [epsilon_lower_bound(1000, 500, v, delta=1e-5) for v in (300, 400, 500)]
    assert 0 < bounds[0] < bounds[1] < bounds[2]


def test_bad_counts_are_named():
    with pytest.raises(ValueError, match="correct"):
        epsilon_lower_bound(10, 5, 6, delta=0.0)
