"""The privacy plan of a run: noise multiplier, sampling rate and denominator, fixed before
any site is contacted. A run whose target cannot be met is refused here, before it spends.

Every plan also says what one round attempt is charged (:meth:`charged_event`), and
:func:`plan_record`, what the sites are told with every round, is built from the same plan
object: a site's policy (client.policy) recomputes exactly the epsilon the server's ledger is
charged. The server plans and charges with it; the sites read what it sends.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

from common import keys
from common.config import RunConfig
from common.dp.accounting import calibrate_noise_multiplier, epsilon
from common.dp.budget import BudgetCheck
from common.dp.dpsgd import dpsgd_schedule
from common.dp.mechanism import PrivacyEvent

# The scope of an event every site spends in its own scope (``site-<index>``): DP-SGD on the
# sites. The server's budget check composes it with the most-spent site's events
# (server.strategy_base).
EACH_SITE = "each-site"


class _Plan:
    """What every plan shares: its fields as JSON takes them (an infinite epsilon as None)."""

    def to_dict(self) -> dict:
        fields = asdict(self)  # type: ignore[call-overload]  # every plan is a dataclass
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in fields.items()}


@dataclass(frozen=True)
class DPAggPlan(_Plan):
    """Record-level DPAgg-TI: ``releases`` releases of the Poisson-subsampled Gaussian sum
    (rate q over images), divided by q*N; ``attempts`` counts the retries the plan pays for."""

    noise_multiplier: float
    sample_rate: float
    releases: int
    denominator: float  # public: q * declared N
    planned_epsilon_prv: float
    planned_epsilon_rdp: float
    attempts: int = 0  # releases + retries the plan pays for (0: releases)

    unit: ClassVar[str] = "record"

    def __post_init__(self) -> None:
        if self.attempts == 0:
            object.__setattr__(self, "attempts", self.releases)

    def charged_event(self, label: str = "") -> PrivacyEvent:
        """What one release attempt is charged: (z, q), record level."""
        return PrivacyEvent.release(self.noise_multiplier, self.sample_rate, "record", label)


@dataclass(frozen=True)
class FedAvgPlan(_Plan):
    """Site-level DP-FedAvg (McMahan et al. 2018): T rounds of the Poisson-subsampled
    Gaussian mechanism over sites. The denominator q*K needs the declared public site count
    K (:meth:`denominator`). ``sample_rate`` is the rate sites are drawn at;
    ``accounting_sample_rate`` the one the ledger charges (1 where no amplification by
    sampling is claimed): the sites are told the charged one."""

    noise_multiplier: float
    sample_rate: float
    rounds: int
    planned_epsilon_prv: float
    planned_epsilon_rdp: float
    accounting_sample_rate: float = 0.0  # the q the ledger claims: 1 when the server knows who took part
    attempts: int = 0  # rounds + retries the plan pays for (0: rounds)

    unit: ClassVar[str] = "site"

    def __post_init__(self) -> None:
        if self.accounting_sample_rate == 0.0:
            object.__setattr__(self, "accounting_sample_rate", self.sample_rate)
        if self.attempts == 0:
            object.__setattr__(self, "attempts", self.rounds)

    def denominator(self, num_sites: int) -> float:
        """q*K with the declared K: never the number of sites that connected or answered."""
        if num_sites < 1:
            raise ValueError("DP-FedAvg needs the declared number of sites K >= 1")
        return self.sample_rate * num_sites

    def charged_event(self, label: str = "") -> PrivacyEvent:
        """What one round attempt is charged: (z, the accounted q), site level."""
        return PrivacyEvent.release(self.noise_multiplier, self.accounting_sample_rate, "site", label)


@dataclass(frozen=True)
class DPSGDPlan(_Plan):
    """Record-level DP-SGD on every site (Abadi et al. 2016), planned by the server from the
    public settings the sites use (:mod:`common.dp.dpsgd`): Poisson batches at
    q = dpsgd-batch-size / declared site size, ``steps_per_round`` steps per round, z for
    ``rounds`` rounds. The server charges a site's round with it and checks the budget
    before every round; the sites are told it and refuse a different one."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int  # round attempts the plan pays for
    declared_site_size: int
    expected_batch_size: float  # q * declared site size: the public denominator of the DP-SGD mean
    planned_epsilon_prv: float
    planned_epsilon_rdp: float

    unit: ClassVar[str] = "record"

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round

    def charged_event(self, label: str = "", scope: str = EACH_SITE) -> PrivacyEvent:
        """What one round costs one site: ``steps_per_round`` steps at (z, q)."""
        return PrivacyEvent.dpsgd(self.noise_multiplier, self.sample_rate, self.steps_per_round, scope=scope,
                                  label=label)


def _planned_epsilons(z: float, q: float, steps: int, unit: str, delta: float, target: float,
                      what: str) -> tuple[float, float]:
    """(PRV, RDP) epsilon of ``steps`` compositions at (z, q); ValueError when the PRV one
    passes a finite ``target`` (the run is refused before it spends)."""
    check = BudgetCheck((), [PrivacyEvent.planned(z, q, steps, unit)], target, delta, "prv")  # type: ignore[arg-type]
    eps_prv, eps_rdp = check.epsilon, epsilon(check.planned, delta, "rdp")
    if check.over:
        raise ValueError(
            f"noise-multiplier {z} gives {unit}-level epsilon {eps_prv:.3f} (PRV) over {steps} {what} at "
            f"sampling rate {q}, above target-epsilon {target}: refusing to start"
        )
    return eps_prv, eps_rdp


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
    eps_prv, eps_rdp = _planned_epsilons(z, q, steps, unit, cfg.target_delta,
                                         cfg.target_epsilon if cfg.private else math.inf, what)
    return z, eps_prv, eps_rdp


def plan_dpagg(cfg: RunConfig) -> DPAggPlan:
    """Calibrate z for ``num-releases`` releases at rate q to reach ``target-epsilon`` (PRV),
    or check an explicit ``noise-multiplier`` against it. Non-private: q = 1, z = 0."""
    q = cfg.effective_sampling_rate
    attempts = cfg.num_releases + cfg.planned_attempts_extra  # every retry of a short release is charged
    z, eps_prv, eps_rdp = _noise_for_target(cfg, q, attempts, "record", "release attempt(s)")
    return DPAggPlan(z, q, cfg.num_releases, q * cfg.dataset_size, eps_prv, eps_rdp, attempts=attempts)


def plan_fedavg(cfg: RunConfig) -> FedAvgPlan:
    """Calibrate the site-level z for ``rounds`` rounds at ``site-sampling-rate`` to reach
    ``target-epsilon`` (PRV), or check an explicit ``noise-multiplier``. Non-private: q = 1, z = 0."""
    q = cfg.effective_site_sampling_rate
    # With distributed noise the server picks, and so knows, the sites of every round while
    # the noise it sees comes from those same sites: no amplification by sampling is claimed.
    q_accounted = 1.0 if cfg.aggregation == "distributed" else q
    attempts = cfg.rounds + cfg.planned_attempts_extra
    z, eps_prv, eps_rdp = _noise_for_target(cfg, q_accounted, attempts, "site", "round attempt(s)")
    return FedAvgPlan(z, q, cfg.rounds, eps_prv, eps_rdp, accounting_sample_rate=q_accounted, attempts=attempts)


def plan_dpsgd(cfg: RunConfig) -> DPSGDPlan | None:
    """The record-level DP-SGD plan of the sites (None when the run has no DP-SGD): the same
    z, q and steps every site computes (:func:`common.dp.dpsgd.dpsgd_schedule`), and its
    planned epsilon; a fixed ``noise-multiplier`` that misses the target is refused here."""
    schedule = dpsgd_schedule(cfg)
    if schedule is None:
        return None
    z, q, steps = schedule.noise_multiplier(), schedule.sample_rate, schedule.budget.total_steps
    eps_prv, eps_rdp = _planned_epsilons(z, q, steps, "record", schedule.budget.delta, schedule.budget.target_epsilon,
                                         "DP-SGD step(s) per site")
    return DPSGDPlan(z, q, schedule.steps_per_round, schedule.rounds, schedule.declared_site_size,
                     schedule.expected_batch_size, eps_prv, eps_rdp)


def plan_record(cfg: RunConfig, plan: DPAggPlan | FedAvgPlan | None, *, dpsgd: DPSGDPlan | None = None) -> dict:
    """The plan as sent to the sites with every round (a ConfigRecord's content), so that each
    site can check it against its own policy before it touches its images.

    Built from the plan objects themselves: the unit, z and q are those of
    :meth:`charged_event` (the accounted q, not the rate sites are drawn at) over every
    attempt the plan pays for, and the DP-SGD plan is the one the server charges per round.
    ``plan`` is None where the server adds no noise (the DP-SGD baseline)."""
    record: dict = {keys.ADAPTER: cfg.adapter, keys.AGGREGATION: cfg.aggregation, keys.PLAN_DELTA: float(cfg.target_delta),
                    keys.PLAN_UNIT: ""}
    if plan is not None:
        event = plan.charged_event()
        record.update({keys.PLAN_UNIT: event.unit, keys.PLAN_NOISE_MULTIPLIER: float(event.noise_multiplier),
                       keys.PLAN_SAMPLE_RATE: float(event.sample_rate), keys.PLAN_STEPS: int(plan.attempts),
                       keys.PLAN_ROUNDS: int(plan.attempts)})
    if dpsgd is not None:
        record.update({keys.PLAN_DPSGD_NOISE_MULTIPLIER: float(dpsgd.noise_multiplier),
                       keys.PLAN_DPSGD_SAMPLE_RATE: float(dpsgd.sample_rate),
                       keys.PLAN_DPSGD_STEPS: int(dpsgd.total_steps)})
        record.setdefault(keys.PLAN_ROUNDS, int(dpsgd.rounds))
    return record
