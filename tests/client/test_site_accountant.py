"""Tests of client/site_accountant.py: the site's DP-SGD accountant and noise-source optimizer."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import RecordDict

from client.site_accountant import NoiseSourceDPOptimizer, begin_round, load_history, site_epsilon
from common.dp.dpsgd import DPSGDBudget, declared_sample_rate
from common.dp import NoiseSource, PrivacyEvent, epsilon

DELTA = 1e-5


def test_dp_optimizer_without_noise_is_mean_of_clipped_per_sample_grads():
    p = torch.nn.Parameter(torch.zeros(1, 3))
    opt = NoiseSourceDPOptimizer(torch.optim.SGD([p], lr=1.0), noise=NoiseSource.seeded(0), noise_multiplier=0.0,
                                 max_grad_norm=1.0, expected_batch_size=4)
    p.grad_sample = torch.tensor([[[3.0, 4.0, 0.0]], [[0.0, 0.5, 0.0]]])  # norms 5 (clipped to 1) and 0.5
    opt.step()
    expected = (torch.tensor([0.6, 0.8, 0.0]) + torch.tensor([0.0, 0.5, 0.0])) / 4  # / expected batch size
    torch.testing.assert_close(p.grad.reshape(-1), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(p.detach().reshape(-1), -expected, atol=1e-6, rtol=1e-5)


def test_dp_optimizer_empty_batch_adds_noise_of_std_zC_over_expected_batch():
    z, clip, expected_batch = 2.0, 0.5, 4
    p = torch.nn.Parameter(torch.zeros(200_000))
    opt = NoiseSourceDPOptimizer(torch.optim.SGD([p], lr=1.0), noise=NoiseSource.seeded(1), noise_multiplier=z,
                                 max_grad_norm=clip, expected_batch_size=expected_batch)
    opt.empty_batch_step()
    std = z * clip / expected_batch
    # 200k draws: the sample sd is within ~0.5% (3 sigma) of its target, the mean within 3 sd/sqrt(n)
    assert abs(p.grad.std().item() / std - 1) < 0.005
    assert abs(p.grad.mean().item()) < 3 * std / math.sqrt(p.numel())
    # seeded noise replays exactly
    q = torch.nn.Parameter(torch.zeros(200_000))
    NoiseSourceDPOptimizer(torch.optim.SGD([q], lr=1.0), noise=NoiseSource.seeded(1), noise_multiplier=z,
                           max_grad_norm=clip, expected_batch_size=expected_batch).empty_batch_step()
    assert torch.equal(p.grad, q.grad)


def test_begin_round_composes_rounds_and_refuses_past_the_target():
    state = RecordDict()
    budget = DPSGDBudget(target_epsilon=2.0, delta=DELTA, total_steps=20, noise_multiplier=3.0)
    z, eps1 = begin_round(state, budget, sample_rate=0.25, steps=10, site_index=3, round_index=1)
    assert z == 3.0
    _, eps2 = begin_round(state, budget, sample_rate=0.25, steps=10, site_index=3, round_index=2)
    # the second round's epsilon is that of 20 steps, recomputed from the whole history
    expected = epsilon([PrivacyEvent(3.0, 0.25, 20, scope="site-3")], DELTA)
    assert eps2 == pytest.approx(expected, rel=1e-6) and eps2 > eps1
    history = load_history(state)
    assert [h.round for h in history] == [1, 2]
    assert site_epsilon(history, 3, DELTA, "rdp") >= eps2 * 0.99
    # a third round would go past 2.0 (2.02) (if not, the test's numbers are wrong)
    third = epsilon([PrivacyEvent(3.0, 0.25, 30)], DELTA)
    assert third > 2.0
    with pytest.raises(ValueError, match="site 3.*above its target 2.0"):
        begin_round(state, budget, sample_rate=0.25, steps=10, site_index=3, round_index=3)
    assert len(load_history(state)) == 2  # nothing spent by the refused round


def test_begin_round_calibrates_for_the_planned_total_steps():
    state = RecordDict()
    budget = DPSGDBudget(target_epsilon=1.0, delta=DELTA, total_steps=30)
    z, _ = begin_round(state, budget, sample_rate=0.5, steps=10, site_index=0, round_index=1)
    planned = epsilon([PrivacyEvent(z, 0.5, 30)], DELTA)
    assert planned <= 1.0 and planned > 0.95  # calibrated, not merely safe
    z2, _ = begin_round(state, budget, sample_rate=0.5, steps=10, site_index=0, round_index=2)
    assert z2 == z  # cached calibration


def test_non_private_budget_has_no_noise_and_infinite_epsilon():
    z, eps = begin_round(RecordDict(), DPSGDBudget(math.inf, DELTA, 10), sample_rate=1.0, steps=5,
                         site_index=0, round_index=1)
    assert z == 0.0 and math.isinf(eps)


def test_declared_sample_rate():
    assert declared_sample_rate(4, 16) == 0.25
    assert declared_sample_rate(8, 4) == 1.0
    with pytest.raises(ValueError):
        declared_sample_rate(4, 0)
