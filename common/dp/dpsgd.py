"""The public schedule of record-level DP-SGD on the sites, derived from the run config alone.

DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016) on a site draws
Poisson batches at rate q, clips every sampled image's gradient to C, adds N(0, (zC)^2) to the
sum and divides by the EXPECTED batch size. Opacus (``DPOptimizer(expected_batch_size=...)``)
takes q = B / n and the expected batch q*n from the site's image count n, which the site then
reports with q: the server learns n. Here every quantity the accountant or the mechanism uses
is public and declared before the run (``site-dataset-size``, the declared upper bound D on
one site's images, falling back to ``dataset-size``):

- q = dpsgd-batch-size / D (1 if D is smaller), Poisson over the site's actual images;
- the clipped sum is divided by q*D, the public expected batch size, never by a count read
  from the data;
- z is calibrated (PRV) for the run's total steps at that q, or fixed by the run config.

So the server and every site compute the same (z, q, steps) from the same config: the site
trains with them, its policy checks them, and the server's ledger charges them. A site holding
more than D images is outside the declared domain of the guarantee: it refuses every round,
before any training (:func:`check_site_size`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.config import DPSGD_MECHANISMS_PER_STEP, RunConfig
from common.dp.accounting import calibrate_noise_multiplier
from common.dp.mechanism import PrivacyEvent


class DeclaredSizeExceeded(ValueError):
    """A site holds more images than the declared ``site-dataset-size``."""


@dataclass(frozen=True)
class DPSGDBudget:
    """The public settings a site's DP-SGD is planned with.

    ``noise_multiplier`` >= 0 fixes z; < 0 calibrates z (PRV) so that ``total_steps`` steps
    at the declared rate reach ``target_epsilon``. Non-private: z = 0, epsilon = inf.
    """

    target_epsilon: float
    delta: float
    total_steps: int
    noise_multiplier: float = -1.0

    @property
    def private(self) -> bool:
        return not math.isinf(self.target_epsilon)


def declared_sample_rate(batch_size: int, declared_size: int) -> float:
    """Poisson rate q = B / D of an expected batch of ``batch_size`` out of the declared
    ``declared_size`` images (1 if D <= B). Public: it never depends on the site's data."""
    if declared_size < 1 or batch_size < 1:
        raise ValueError(f"batch size and declared site size must be >= 1, got {batch_size} and {declared_size}")
    return min(1.0, batch_size / declared_size)


def budget_noise_multiplier(budget: DPSGDBudget, sample_rate: float) -> float:
    """z of every step: 0 without privacy, the budget's fixed z, or the smallest z (PRV) whose
    ``total_steps`` steps at ``sample_rate`` stay within the target. Deterministic in public
    settings, so the server and every site find the same z."""
    if not budget.private:
        return 0.0
    if budget.noise_multiplier >= 0:
        return float(budget.noise_multiplier)
    return calibrate_noise_multiplier(budget.target_epsilon, budget.delta, sample_rate, steps=budget.total_steps,
                                      unit="record", accountant="prv")


@dataclass(frozen=True)
class DPSGDSchedule:
    """What a run's DP-SGD spends on each site, from public settings only.

    ``steps_per_round`` steps per round a site takes part in, ``budget.total_steps`` over the
    run; batches of expected size ``batch_size`` out of the declared ``declared_site_size``."""

    budget: DPSGDBudget
    batch_size: int
    declared_site_size: int
    steps_per_round: int

    @property
    def sample_rate(self) -> float:
        return declared_sample_rate(self.batch_size, self.declared_site_size)

    @property
    def expected_batch_size(self) -> float:
        """q*D: the public denominator of the DP-SGD mean (Opacus' ``expected_batch_size``)."""
        return self.sample_rate * self.declared_site_size

    @property
    def rounds(self) -> int:
        return self.budget.total_steps // self.steps_per_round

    def noise_multiplier(self) -> float:
        return budget_noise_multiplier(self.budget, self.sample_rate)

    def round_event(self, noise_multiplier: float, *, scope: str = "all", label: str = "") -> PrivacyEvent:
        """One round of this schedule on one site: ``steps_per_round`` steps at (z, q)."""
        return PrivacyEvent.dpsgd(noise_multiplier, self.sample_rate, self.steps_per_round, scope=scope, label=label)

    def check_site_size(self, num_images: int, site: str) -> None:
        """Refuse a site holding more images than declared: the accountant's q and the DP-SGD
        denominator assume at most D. Checked at every round before any training, so the
        site refuses consistently and spends nothing; the message carries no count. A private
        site may hold none (its Poisson batches are all empty: noise-only steps)."""
        if num_images < 1 and not self.budget.private:
            raise ValueError(f"{site}: a site needs at least one image")
        if self.budget.private and num_images > self.declared_site_size:
            raise DeclaredSizeExceeded(
                f"{site}: holds more images than the declared site-dataset-size; refusing DP-SGD before any "
                "training (raise site-dataset-size for every site, or remove images)")


def dpsgd_schedule(cfg: RunConfig, budget: DPSGDBudget | None = None) -> DPSGDSchedule | None:
    """The run's DP-SGD schedule (None when no site runs DP-SGD).

    The TI baseline (``ti-method = dp-sgd``) plans ``dpsgd-rounds`` x ``dpsgd-local-steps``
    steps for ``target-epsilon`` (or the fixed ``noise-multiplier``); LoRA with defense
    ``dp-sgd`` plans (``rounds`` + retries) x ``local-steps`` steps for
    ``record-target-epsilon``, and ``smp-dp-sgd`` twice as many (each local step runs the
    proxy attacker's DP-SGD step and the adapter's, :mod:`client.smp_dpsgd`). Both draw batches of expected size ``dpsgd-batch-size``.
    ``budget`` overrides the config's (benchmarks fix z with it)."""
    if cfg.adapter == "ti" and cfg.ti_method == "dp-sgd":
        steps = cfg.dpsgd_local_steps
        budget = budget or DPSGDBudget(cfg.target_epsilon, cfg.target_delta, cfg.dpsgd_rounds * steps,
                                       cfg.noise_multiplier)
    elif cfg.site_dpsgd:
        steps = cfg.local_steps * DPSGD_MECHANISMS_PER_STEP[cfg.defense]  # smp-dp-sgd: attacker's + adapter's
        budget = budget or DPSGDBudget(cfg.record_epsilon_target, cfg.target_delta,
                                       (cfg.rounds + cfg.planned_attempts_extra) * steps)
    else:
        return None
    return DPSGDSchedule(budget=budget, batch_size=cfg.dpsgd_batch_size, declared_site_size=cfg.declared_site_size,
                         steps_per_round=steps)
