"""Tests of common/dp/plan.py: the privacy plan is fixed, and checked, before any site is contacted."""

from __future__ import annotations

import math

import pytest

from common import keys
from common.config import RunConfig
from common.dp import PrivacyEvent, epsilon
from common.dp.plan import EACH_SITE, plan_dpagg, plan_dpsgd, plan_fedavg, plan_record


def cfg(**overrides) -> RunConfig:
    return RunConfig.from_run_config(overrides)


@pytest.mark.parametrize("q, rounds", [(1.0, 5), (0.5, 10)])
def test_fedavg_plan_calibrates_z_for_t_rounds_at_the_site_rate(q, rounds):
    c = cfg(**{"adapter": "lora", "num-sites": 8, "target-epsilon": 2.0, "site-sampling-rate": q, "rounds": rounds})
    plan = plan_fedavg(c)
    assert plan.sample_rate == q and plan.rounds == rounds
    eps = epsilon([PrivacyEvent(plan.noise_multiplier, q, rounds, unit="site")], 1e-5, "prv")
    assert eps == pytest.approx(plan.planned_epsilon_prv)
    assert 1.95 < eps <= 2.0  # calibrated, not just safe
    assert plan.planned_epsilon_rdp >= eps
    assert plan.denominator(8) == q * 8


def test_fedavg_plan_refuses_an_explicit_noise_that_misses_the_target():
    c = cfg(**{"adapter": "lora", "num-sites": 4, "target-epsilon": 1.0, "noise-multiplier": 0.5, "rounds": 10})
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


def test_the_plan_sent_to_the_sites_is_the_charged_one():
    """Distributed LoRA draws sites at q = 0.5 but charges q = 1 (no amplification claimed):
    the sites are told the charged q, over every attempt the plan pays for."""
    c = cfg(**{"adapter": "lora", "num-sites": 4, "aggregation": "distributed", "site-sampling-rate": 0.5,
               "rounds": 3, "short-round": "retry", "max-retries": 1})
    plan = plan_fedavg(c)
    sent = plan_record(c, plan)
    assert plan.sample_rate == 0.5 and plan.accounting_sample_rate == 1.0 and plan.attempts == 4
    assert (sent[keys.PLAN_UNIT], sent[keys.PLAN_SAMPLE_RATE], sent[keys.PLAN_STEPS]) == ("site", 1.0, 4)
    assert sent[keys.PLAN_NOISE_MULTIPLIER] == plan.charged_event().noise_multiplier == plan.noise_multiplier


def test_the_dpsgd_plan_uses_the_declared_site_size():
    c = cfg(**{"ti-method": "dp-sgd", "site-dataset-size": 16, "dpsgd-batch-size": 4, "dpsgd-rounds": 2,
               "dpsgd-local-steps": 5})
    plan = plan_dpsgd(c)
    assert plan.sample_rate == 0.25 and plan.expected_batch_size == 4.0 and plan.total_steps == 10
    assert 0.95 < plan.planned_epsilon_prv <= 1.0
    event = plan.charged_event()
    assert (event.steps, event.scope, event.unit) == (5, EACH_SITE, "record")
    sent = plan_record(c, None, dpsgd=plan)
    assert sent[keys.PLAN_UNIT] == "" and sent[keys.PLAN_DPSGD_STEPS] == 10 and sent[keys.PLAN_ROUNDS] == 2
    assert sent[keys.PLAN_DPSGD_SAMPLE_RATE] == 0.25
    with pytest.raises(ValueError, match="record-level epsilon .* refusing to start"):
        plan_dpsgd(cfg(**{"ti-method": "dp-sgd", "noise-multiplier": 0.3}))
    assert plan_dpsgd(cfg()) is None  # DPAgg-TI: no DP-SGD on the sites
