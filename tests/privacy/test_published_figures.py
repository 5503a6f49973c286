"""Red team: the figures a run publishes beside its adapter carry nothing of the noise or the timing.

Two attacks on what used to land in the output folder:
- round_metrics.json printed each round's realised noise norm ||mean - sum/(qK)||. With the
  release R, a candidate clipped sum T is then tested exactly: ||R - T/(qK)|| equals that norm
  for the true sum only. The file now prints the expected norm z*C*sqrt(d)/(qK), computed from
  public quantities: it must be the same whatever noise was drawn.
- metrics.json printed the run's wall time, which grows with the sites' secret Poisson counts.
"""

from __future__ import annotations

import math

import torch
from flwr.app import ConfigRecord

from common.dp import GaussianSumMechanism, NoiseSource, PrivacyLedger
from common.dp.plan import plan_fedavg
from common.dp.sampling import sampling_generator
from server.lora_strategy import DPFedAvgLoRA
from tests.privacy.test_declared_counts import SHAPES, ZeroDeltaSites, lora_config


def run_with_noise_seed(seed: int, rounds: int = 5) -> DPFedAvgLoRA:
    cfg = lora_config(4, rounds=rounds)
    plan = plan_fedavg(cfg)
    strategy = DPFedAvgLoRA(plan=plan, mechanism=GaussianSumMechanism(clip_norm=cfg.lora_clip_norm,
                                                                      noise_multiplier=plan.noise_multiplier),
                            noise=NoiseSource.seeded(seed), sampling=sampling_generator(seed + 1),
                            ledger=PrivacyLedger(delta=1e-5), initial={k: torch.zeros(s) for k, s in SHAPES.items()},
                            defense="none", private=True, num_sites=cfg.num_sites)
    strategy.start(grid=ZeroDeltaSites(4), initial_arrays=strategy.current_arrays(), num_rounds=rounds, timeout=5.0,
                   train_config=ConfigRecord())
    return strategy


def test_round_metrics_hold_no_figure_of_the_realised_noise():
    a, b = run_with_noise_seed(1), run_with_noise_seed(2)
    assert any(not torch.equal(a.global_state[k], b.global_state[k]) for k in SHAPES)  # different noise was drawn
    # whatever noise was drawn, the published noise figure is the same
    assert [r["expected_noise_norm_of_mean"] for r in a.round_summaries()] == \
           [r["expected_noise_norm_of_mean"] for r in b.round_summaries()]
    d = sum(math.prod(s) for s in SHAPES.values())
    expected = a.plan.noise_multiplier * a.mechanism.clip_norm * math.sqrt(d) / a.denominator
    for summary in a.round_summaries():
        assert summary["expected_noise_norm_of_mean"] == round(expected, 6)  # public quantities only
        # no published figure is the realised noise's norm (the update norm is post-processing of the release)
        assert "noise_norm_of_mean" not in summary
