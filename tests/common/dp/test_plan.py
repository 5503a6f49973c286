"""Tests of common/dp/plan.py: the privacy plan is fixed, and checked, before any site is contacted."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest

from common import keys
from common.config import RunConfig, parse_overrides, pyproject_run_config
from common.dp import PrivacyEvent, epsilon
from common.dp.plan import (
    EACH_SITE,
    plan_dpagg,
    plan_dpsgd,
    plan_fedavg,
    plan_record,
    refuse_without_signal,
    signal_to_noise,
)
from common.paths import REPO_ROOT


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


# ---- signal and noise: can the release carry signal at all? ------------------------------

# d of a rank-4 LoRA on to_q, to_k, to_v, to_out.0 of assets/emoji-sd's UNet (the demo's base;
# tests/server/test_lora_run.py builds the adapter and finds the same count)
EMOJI_SD_LORA = 43008


def four_sites(**extra) -> RunConfig:
    """The case the planner must catch: site-level DP-FedAvg over 4 sites at epsilon = 1, 5 rounds."""
    return cfg(**{"adapter": "lora", "num-sites": 4, "target-epsilon": 1.0, "rounds": 5, **extra})


def refusal(c: RunConfig, d: int = EMOJI_SD_LORA) -> str | None:
    """The refusal's text, or None when the run may start."""
    plan = plan_fedavg(c) if c.adapter == "lora" else plan_dpagg(c)
    try:
        refuse_without_signal(c, plan, signal_to_noise(c, plan, d))
    except ValueError as err:
        return str(err)
    return None


def test_four_sites_at_epsilon_one_are_refused_by_default():
    """The published adapter of this run was pure noise: a released update of norm 43.8, all of it
    noise, where the mean of the clipped deltas has norm at most C = 0.1."""
    c = four_sites()
    plan = plan_fedavg(c)
    figures = signal_to_noise(c, plan, EMOJI_SD_LORA)
    assert figures.expected_noise_norm_of_mean == pytest.approx(43.8, rel=0.01) and figures.max_signal_norm == 0.1
    assert figures.refused and figures.ratio_over_releases > 100
    text = refusal(c)
    assert text is not None and "cannot carry signal" in text
    for expected in (f"{figures.expected_noise_norm_of_mean:.4g}", "largest possible signal C = 0.1",
                     f"K* = z*sqrt(d)/q = {figures.crossing_count:.4g} sites", "above max-noise-to-signal = 10",
                     "defense = 'dp-sgd' with record-target-epsilon", "num-sites >= ", "target-epsilon >= ",
                     "rounds = 1", "max-noise-to-signal = inf", "nothing was charged"):
        assert expected in text, expected


def test_the_override_lets_it_run():
    c = four_sites(**{"max-noise-to-signal": "inf"})
    assert refusal(c) is None
    figures = signal_to_noise(c, plan_fedavg(c), EMOJI_SD_LORA)
    assert figures.to_dict()["threshold"] is None and "not checked (max-noise-to-signal = inf)" in figures.summary
    assert refusal(four_sites(**{"max-noise-to-signal": 1000.0})) is None  # a stated factor above the ratio


def test_what_the_refusal_proposes_passes():
    """More sites, a larger epsilon, record-level DP with a larger site-level epsilon: each
    figure the refusal names lets the run start, and one site fewer does not."""
    text = refusal(four_sites())
    sites = int(re.search(r"num-sites >= (\d+)", text).group(1))
    assert refusal(four_sites(**{"num-sites": sites})) is None
    assert refusal(four_sites(**{"num-sites": sites - 1})) is not None
    eps = float(re.search(r"a larger epsilon: target-epsilon >= ([0-9.e+]+)", text).group(1))
    assert refusal(four_sites(**{"target-epsilon": eps * 1.02})) is None
    assert refusal(four_sites(**{"target-epsilon": eps * 0.9})) is not None
    assert refusal(four_sites(**{"defense": "dp-sgd", "record-target-epsilon": 1.0, "target-epsilon": eps * 1.02})) is None


def test_dp_sgd_sites_are_checked_on_the_server_s_own_noise():
    """With DP-SGD on the sites the server still adds its site-level noise, calibrated to
    target-epsilon: the figure describes it exactly, and the sites' noise only adds to it."""
    c = four_sites(defense="dp-sgd", **{"record-target-epsilon": 1.0})
    figures = signal_to_noise(c, plan_fedavg(c), EMOJI_SD_LORA)
    assert replace(figures, note="") == signal_to_noise(four_sites(), plan_fedavg(four_sites()), EMOJI_SD_LORA)
    assert "DP-SGD" in figures.note
    assert figures.refused and "keep defense = 'dp-sgd'" in refusal(c)


# explicit noise multipliers (no calibration: fast), within a target they meet
@pytest.mark.parametrize("overrides, d", [
    ({"adapter": "lora", "num-sites": 8, "site-sampling-rate": 0.5, "rounds": 3, "lora-clip-norm": 0.2,
      "noise-multiplier": 3.0, "target-epsilon": 20.0}, 9984),
    ({"adapter": "lora", "num-sites": 4, "aggregation": "distributed", "site-sampling-rate": 0.5, "rounds": 2,
      "noise-multiplier": 4.0, "target-epsilon": 20.0}, 5000),
    ({"sampling-rate": 0.25, "dataset-size": 400, "num-releases": 4, "clip-norm": 0.3, "noise-multiplier": 2.0,
      "target-epsilon": 20.0}, 768),
])
def test_the_figures_follow_the_formula(overrides, d):
    c = cfg(**overrides)
    plan = plan_fedavg(c) if c.adapter == "lora" else plan_dpagg(c)
    f = signal_to_noise(c, plan, d)
    z, q = plan.noise_multiplier, plan.sample_rate
    count, clip = (c.num_sites, c.lora_clip_norm) if c.adapter == "lora" else (c.dataset_size, c.clip_norm)
    releases = c.rounds if c.adapter == "lora" else c.num_releases
    assert (f.dimension, f.declared_count, f.clip_norm, f.max_signal_norm, f.releases) == (d, count, clip, clip, releases)
    assert f.denominator == pytest.approx(q * count)
    assert f.expected_noise_norm_of_mean == pytest.approx(z * clip * math.sqrt(d) / (q * count))
    assert f.ratio == pytest.approx(z * math.sqrt(d) / (q * count))
    assert f.crossing_count == pytest.approx(z * math.sqrt(d) / q)
    assert f.ratio_over_releases == pytest.approx(f.ratio / math.sqrt(releases))
    assert f.crossing_count_over_releases == pytest.approx(f.crossing_count / math.sqrt(releases))
    assert json.loads(json.dumps(f.to_dict()))["summary"] == f.summary  # privacy.json takes it as it is


def demo_config() -> RunConfig:
    """The README's main job: scripts/demo.sh's private run (its ``demo=`` overrides on pyproject's config)."""
    script = (REPO_ROOT / "scripts" / "demo.sh").read_text()
    parts = [m.group(1).removeprefix("$demo ") for m in re.finditer(r'^demo="(.*)"$', script, re.MULTILINE)]
    overrides = parse_overrides(" ".join(parts))
    assert overrides["model-path"] == "assets/emoji-sd" and overrides["clip-norm"] == 0.5
    return RunConfig.from_run_config({**pyproject_run_config(), **overrides, "num-sites": 4})


def test_the_readme_main_job_is_not_refused():
    c = demo_config()
    d = json.loads((REPO_ROOT / c.model_path / "text_encoder" / "config.json").read_text())["hidden_size"]
    plan = plan_dpagg(c)
    figures = signal_to_noise(c, plan, d)
    refuse_without_signal(c, plan, figures)  # no ValueError
    assert not figures.refused and figures.ratio < 1  # the noise on the release is below the largest signal
    assert figures.crossing_count < c.dataset_size and figures.threshold == 10.0


def test_non_private_runs_are_never_checked():
    for c in (cfg(**{"adapter": "lora", "target-epsilon": "inf"}), cfg(**{"target-epsilon": "inf", "dataset-size": 1})):
        plan = plan_fedavg(c) if c.adapter == "lora" else plan_dpagg(c)
        assert signal_to_noise(c, plan, 10**6) is None
        refuse_without_signal(c, plan, None)  # no ValueError
