"""Tests of server/plan.py: the privacy plan is fixed, and checked, before any site is contacted."""

from __future__ import annotations

import math

import pytest

from common.config import RunConfig
from common.dp import PrivacyEvent, epsilon
from server.plan import plan_dpagg, plan_fedavg


def cfg(**overrides) -> RunConfig:
    return RunConfig.from_run_config(overrides)


@pytest.mark.parametrize("q, rounds", [(1.0, 5), (0.5, 10)])
def test_fedavg_plan_calibrates_z_for_t_rounds_at_the_site_rate(q, rounds):
    c = cfg(**{"adapter": "lora", "target-epsilon": 2.0, "site-sampling-rate": q, "rounds": rounds})
    plan = plan_fedavg(c)
    assert plan.sample_rate == q and plan.rounds == rounds
    eps = epsilon([PrivacyEvent(plan.noise_multiplier, q, rounds, unit="site")], 1e-5, "prv")
    assert eps == pytest.approx(plan.planned_epsilon_prv)
    assert 1.95 < eps <= 2.0  # calibrated, not just safe
    assert plan.planned_epsilon_rdp >= eps
    assert plan.denominator(8) == q * 8


def test_fedavg_plan_refuses_an_explicit_noise_that_misses_the_target():
    c = cfg(**{"adapter": "lora", "target-epsilon": 1.0, "noise-multiplier": 0.5, "rounds": 10})
    with pytest.raises(ValueError, match="site-level epsilon .* above target-epsilon 1.0: refusing to start"):
        plan_fedavg(c)


def test_fedavg_plan_non_private_has_no_noise_and_every_site():
    plan = plan_fedavg(cfg(**{"adapter": "lora", "target-epsilon": "inf", "site-sampling-rate": 0.3}))
    assert plan.noise_multiplier == 0.0 and plan.sample_rate == 1.0 and math.isinf(plan.planned_epsilon_prv)


def test_dpagg_plan_uses_the_declared_count_for_its_denominator():
    plan = plan_dpagg(cfg(**{"sampling-rate": 0.25, "dataset-size": 40}))
    assert plan.denominator == 10.0 and plan.planned_epsilon_prv <= 1.0
    with pytest.raises(ValueError, match="record-level epsilon"):
        plan_dpagg(cfg(**{"noise-multiplier": 0.1}))
