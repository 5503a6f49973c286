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


@dataclass(frozen=True)
class FedAvgPlan:
    """Site-level DP-FedAvg (McMahan et al. 2018): T rounds of the Poisson-subsampled
    Gaussian mechanism over sites. The denominator q*K needs the public site count K,
    fixed when the run starts (:meth:`denominator`)."""

    noise_multiplier: float
    sample_rate: float
    rounds: int
    planned_epsilon_prv: float
    planned_epsilon_rdp: float
    accounting_sample_rate: float = 0.0  # the q the ledger claims: 1 when the server knows who took part

    def __post_init__(self) -> None:
        if self.accounting_sample_rate == 0.0:
            object.__setattr__(self, "accounting_sample_rate", self.sample_rate)

    def denominator(self, num_sites: int) -> float:
        if num_sites < 1:
            raise ValueError("DP-FedAvg needs at least one site")
        return self.sample_rate * num_sites

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}


def _noise_for_target(cfg: RunConfig, q: float, steps: int, unit: str, what: str) -> tuple[float, float, float]:
    """(z, planned PRV epsilon, planned RDP epsilon) for ``steps`` compositions at rate q:
    z = 0 when non-private, the explicit ``noise-multiplier`` if >= 0, else calibrated (PRV)
    to ``target-epsilon``. Raises ValueError when the target is not met."""
    if not cfg.private:
        z = 0.0
    elif cfg.noise_multiplier >= 0:
        z = cfg.noise_multiplier
    else:
        z = calibrate_noise_multiplier(cfg.target_epsilon, cfg.target_delta, q, steps, unit=unit)
    planned = [PrivacyEvent(noise_multiplier=z, sample_rate=q, steps=steps, unit=unit)]  # type: ignore[arg-type]
    eps_prv = epsilon(planned, cfg.target_delta, "prv")
    eps_rdp = epsilon(planned, cfg.target_delta, "rdp")
    if cfg.private and eps_prv > cfg.target_epsilon:
        raise ValueError(
            f"noise-multiplier {z} gives {unit}-level epsilon {eps_prv:.3f} (PRV) over {steps} {what} at "
            f"sampling rate {q}, above target-epsilon {cfg.target_epsilon}: refusing to start"
        )
    return z, eps_prv, eps_rdp


def plan_dpagg(cfg: RunConfig) -> DPAggPlan:
    """Calibrate z for ``num-releases`` releases at rate q to reach ``target-epsilon`` (PRV),
    or check an explicit ``noise-multiplier`` against it. Non-private: q = 1, z = 0."""
    q = cfg.effective_sampling_rate
    # every retry of a short release is charged: the plan pays for them up front
    z, eps_prv, eps_rdp = _noise_for_target(cfg, q, cfg.num_releases + cfg.planned_attempts_extra, "record",
                                            "release attempt(s)")
    return DPAggPlan(z, q, cfg.num_releases, q * cfg.dataset_size, eps_prv, eps_rdp)


def plan_fedavg(cfg: RunConfig) -> FedAvgPlan:
    """Calibrate the site-level z for ``rounds`` rounds at ``site-sampling-rate`` to reach
    ``target-epsilon`` (PRV), or check an explicit ``noise-multiplier``. Non-private: q = 1, z = 0."""
    q = cfg.effective_site_sampling_rate
    # With distributed noise the server picks, and so knows, the sites of every round while
    # the noise it sees comes from those same sites: no amplification by sampling is claimed.
    q_accounted = 1.0 if cfg.aggregation == "distributed" else q
    z, eps_prv, eps_rdp = _noise_for_target(cfg, q_accounted, cfg.rounds + cfg.planned_attempts_extra, "site",
                                            "round attempt(s)")
    return FedAvgPlan(z, q, cfg.rounds, eps_prv, eps_rdp, accounting_sample_rate=q_accounted)


def plan_record(cfg: RunConfig, *, unit: str, noise_multiplier: float, sample_rate: float, steps: int,
                rounds: int, aggregation: str = "central") -> dict:
    """The plan as sent to the sites with every round (a ConfigRecord's content), so that each
    site can check it against its own policy before it touches its images."""
    from common import keys

    return {
        keys.ADAPTER: cfg.adapter,
        keys.AGGREGATION: aggregation,
        keys.PLAN_UNIT: unit,
        keys.PLAN_NOISE_MULTIPLIER: float(noise_multiplier),
        keys.PLAN_SAMPLE_RATE: float(sample_rate),
        keys.PLAN_STEPS: int(steps),
        keys.PLAN_ROUNDS: int(rounds),
        keys.PLAN_DELTA: float(cfg.target_delta),
    }
