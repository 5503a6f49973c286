"""The privacy plan of a run: noise multiplier, sampling rate and denominator, fixed before
any site is contacted. A run whose target cannot be met is refused here, before it spends."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from common.config import RunConfig
from common.dp import PrivacyEvent, calibrate_noise_multiplier, epsilon


@dataclass(frozen=True)
class DPAggPlan:
    noise_multiplier: float
    sample_rate: float
    releases: int
    denominator: float  # public: q * declared N
    planned_epsilon_prv: float
    planned_epsilon_rdp: float

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}


def plan_dpagg(cfg: RunConfig) -> DPAggPlan:
    """Calibrate z for ``num-releases`` releases at rate q to reach ``target-epsilon`` (PRV),
    or check an explicit ``noise-multiplier`` against it. Non-private: q = 1, z = 0."""
    q = cfg.effective_sampling_rate
    if not cfg.private:
        z = 0.0
    elif cfg.noise_multiplier >= 0:
        z = cfg.noise_multiplier
    else:
        z = calibrate_noise_multiplier(cfg.target_epsilon, cfg.target_delta, q, cfg.num_releases, unit="record")
    planned = [PrivacyEvent(noise_multiplier=z, sample_rate=q, steps=cfg.num_releases, unit="record")]
    eps_prv = epsilon(planned, cfg.target_delta, "prv")
    eps_rdp = epsilon(planned, cfg.target_delta, "rdp")
    if cfg.private and eps_prv > cfg.target_epsilon:
        raise ValueError(
            f"noise-multiplier {z} gives epsilon {eps_prv:.3f} (PRV) over {cfg.num_releases} release(s) at "
            f"sampling-rate {q}, above target-epsilon {cfg.target_epsilon}: refusing to start"
        )
    return DPAggPlan(z, q, cfg.num_releases, q * cfg.dataset_size, eps_prv, eps_rdp)
