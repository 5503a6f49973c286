"""The privacy plan of a run: noise multiplier, sampling rate and denominator, fixed before
any site is contacted. A run whose target cannot be met is refused here, before it spends.

Every plan also says what one round attempt is charged (:meth:`charged_event`), and
:func:`plan_record`, what the sites are told with every round, is built from the same plan
object: a site's policy (client.policy) recomputes exactly the epsilon the server's ledger is
charged. The server plans and charges with it; the sites read what it sends.

:func:`signal_to_noise` says, from the plan, the declared count and the number of released
parameters, whether the release can carry signal at all, and :func:`refuse_without_signal`
refuses a private run whose noise drowns the largest possible signal, before it spends.
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
from common.dp.mechanism import PrivacyEvent, expected_noise_norm_of_mean

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


@dataclass(frozen=True)
class SignalToNoise(_Plan):
    """Whether a private release can carry signal, from public settings alone, before any
    site is contacted (privacy.json's ``signal_to_noise``, the model card and the server log).

    A release is the sum of records bounded to L2 norm C plus N(0, (zC)^2 I_d), divided by the
    public denominator q*M (M, the declared count: images N for DPAgg-TI, sites K for
    DP-FedAvg; d, the number of released parameters: the embedding dimension, or the LoRA
    adapter's parameter count). The mean of the bounded records has norm at most C when the
    expected count contributes, while the noise on it has expected norm z*C*sqrt(d)/(q*M)
    (:func:`~common.dp.mechanism.expected_noise_norm_of_mean`). Their ratio z*sqrt(d)/(q*M)
    does not depend on C, and they cross at M* = z*sqrt(d)/q.

    Over R releases (DPAgg-TI averages its ``num-releases``; DP-FedAvg adds its T rounds into
    the adapter) the noise grows as sqrt(R) and the signal at most R-fold, so the published
    adapter's ratio is at best ``ratio / sqrt(R)``: the check reads that one
    (``ratio_over_releases``), so it never refuses a run whose adapter could carry signal by
    the threshold's standard. At q = 1, T rounds at z compose exactly as one round at
    z/sqrt(T) (Gaussian composition), so fewer rounds lower each round's noise, not this bound.

    With DP-SGD on the sites (LoRA ``defense = "dp-sgd"``) the server still adds its site-level
    noise, which is what this figure measures; the sites' own noise sits inside each clipped
    delta on top of it, so the true noise is at least this: the check still holds (``note``).
    """

    unit: str  # the privacy unit of the release the figure describes ("record", "site")
    count_key: str  # the run-config key of the declared count: "dataset-size" or "num-sites"
    count_name: str  # "images" or "sites"
    declared_count: int  # M: N or K, declared public before the run (never who connected)
    dimension: int  # d: released parameters
    noise_multiplier: float  # z
    sample_rate: float  # q
    clip_norm: float  # C
    denominator: float  # q*M
    releases: int  # R: releases averaged (DPAgg-TI) or rounds added into the adapter (DP-FedAvg)
    release_name: str  # "release" or "round"
    expected_noise_norm_of_mean: float  # z*C*sqrt(d)/(q*M), one release
    max_signal_norm: float  # C
    ratio: float  # expected_noise_norm_of_mean / max_signal_norm, one release
    crossing_count: float  # M* = z*sqrt(d)/q: the declared count at which one release's ratio is 1
    ratio_over_releases: float  # ratio / sqrt(R): the published adapter's, at best
    crossing_count_over_releases: float  # M*/sqrt(R)
    threshold: float  # max-noise-to-signal (inf: not checked)
    note: str = ""

    @property
    def refused(self) -> bool:
        """True when even at best the published adapter's noise exceeds ``threshold`` times its signal."""
        return self.ratio_over_releases > self.threshold

    @property
    def symbol(self) -> str:
        return "N" if self.count_key == "dataset-size" else "K"

    def _over(self, what: str, value: float) -> str:
        """``value`` over the R releases, in words (nothing when R = 1)."""
        if self.releases == 1:
            return ""
        return f", {value:.4g} over the {self.releases} {self.release_name}s{what}"

    @property
    def figures(self) -> str:
        """The figures in one sentence (the log, the model card, the refusal)."""
        m, r = self.symbol, self.release_name
        averaged = (f" (the noise adds up as sqrt({self.releases}), the signal at most {self.releases}-fold)"
                    if self.releases > 1 else "")
        return (f"expected noise norm of the released mean z*C*sqrt(d)/(q*{m}) = {self.noise_multiplier:.4g} x "
                f"{self.clip_norm:g} x sqrt({self.dimension}) / ({self.sample_rate:g} x {self.declared_count}) = "
                f"{self.expected_noise_norm_of_mean:.4g} against a largest possible signal C = {self.max_signal_norm:g}: "
                f"noise-to-signal ratio {self.ratio:.4g} per {r}{self._over(averaged, self.ratio_over_releases)}; noise "
                f"and signal cross at {m}* = z*sqrt(d)/q = {self.crossing_count:.4g} {self.count_name} per {r}"
                f"{self._over('', self.crossing_count_over_releases)} (declared {m} = {self.declared_count})")

    @property
    def summary(self) -> str:
        """:attr:`figures` and the check's outcome."""
        if math.isinf(self.threshold):
            verdict = "not checked (max-noise-to-signal = inf)"
        else:
            verdict = (f"{'above' if self.refused else 'within'} max-noise-to-signal = {self.threshold:g}"
                       f"{' over the run' if self.releases > 1 else ''}")
        note = f" {self.note}" if self.note else ""
        return f"Signal and noise, planned from public settings: {self.figures}; {verdict}.{note}"

    def to_dict(self) -> dict:
        return {**super().to_dict(), "summary": self.summary}


def signal_to_noise(cfg: RunConfig, plan: DPAggPlan | FedAvgPlan, dimension: int) -> SignalToNoise | None:
    """The :class:`SignalToNoise` of a run's release: ``dimension`` released parameters, the
    plan's z, q and denominator, the clip norm and the declared count. None for a non-private
    run (no noise: never refused)."""
    if not cfg.private:
        return None
    if isinstance(plan, DPAggPlan):
        count, count_key, count_name, clip = cfg.dataset_size, "dataset-size", "images", cfg.clip_norm
        denominator, releases, release_name, note = plan.denominator, plan.releases, "release", ""
    else:
        count, count_key, count_name, clip = cfg.num_sites, "num-sites", "sites", cfg.lora_clip_norm
        denominator, releases, release_name = plan.denominator(cfg.num_sites), plan.rounds, "round"
        note = ("The sites' own DP-SGD noise comes on top, inside each clipped delta, and is not counted: the noise "
                "is at least this." if cfg.site_dpsgd else "")
    noise = expected_noise_norm_of_mean(plan.noise_multiplier, clip, dimension, denominator)
    ratio = noise / clip
    over = ratio / math.sqrt(releases)
    return SignalToNoise(plan.unit, count_key, count_name, count, dimension, plan.noise_multiplier, plan.sample_rate,
                         clip, denominator, releases, release_name, noise, clip, ratio, ratio * count, over,
                         over * count, cfg.max_noise_to_signal, note)


def refuse_without_signal(cfg: RunConfig, plan: DPAggPlan | FedAvgPlan, figures: SignalToNoise | None) -> None:
    """Raise ValueError, naming the figures and what would pass, when the run's published
    adapter cannot carry signal (:attr:`SignalToNoise.refused`). Called before any site is
    contacted: nothing is sent, nothing is charged."""
    if figures is None or not figures.refused:
        return
    f, m = figures, figures.symbol
    event = plan.charged_event()
    # the largest z that passes, and the epsilon it would spend over the plan's attempts
    z_pass = f.noise_multiplier * f.threshold / f.ratio_over_releases
    try:
        eps_pass = epsilon([PrivacyEvent.planned(z_pass, event.sample_rate, plan.attempts, event.unit)],
                           cfg.target_delta, "prv")
    except (ValueError, ArithmeticError):  # a z too small for the accountant: no finite epsilon
        eps_pass = math.inf
    eps_words = f"target-epsilon >= {eps_pass:.4g}" if math.isfinite(eps_pass) else "no finite target-epsilon"
    fix_eps = (f"a larger epsilon: {eps_words} (z <= {z_pass:.4g}) passes at the same {f.release_name}s and sampling "
               "rate" + (f"; with an explicit noise-multiplier, noise-multiplier <= {z_pass:.4g}"
                         if cfg.noise_multiplier >= 0 else ""))
    count_pass = math.ceil(f.crossing_count_over_releases / f.threshold)
    fixes = [f"more {f.count_name}: {f.count_key} >= {count_pass} passes (noise equals signal at "
             f"{m}* = {f.crossing_count_over_releases:.4g}{' over the run' if f.releases > 1 else ''}); declare only "
             f"the true count", fix_eps]
    if f.unit == "site":
        record = (f"keep defense = {cfg.defense!r} with record-target-epsilon for one image, and raise the site-level "
                  f"target-epsilon to >= {eps_pass:.4g}" if cfg.site_dpsgd else
                  f"defense = 'dp-sgd' with record-target-epsilon = {cfg.target_epsilon:g} for one image and a "
                  f"site-level target-epsilon >= {eps_pass:.4g} (the server's site-level noise is what this check "
                  f"measures)")
        fixes.insert(0, f"record-level DP instead of site-level: {record}; or adapter = 'ti' (DPAgg-TI, one "
                        f"embedding per image, denominator q*N over the declared images)")
    key = "rounds" if f.release_name == "round" else "num-releases"
    if f.releases > 1 and cfg.noise_multiplier < 0:
        z_one = calibrate_noise_multiplier(cfg.target_epsilon, cfg.target_delta, event.sample_rate,
                                           1 + cfg.planned_attempts_extra, unit=event.unit)
        ratio_one = f.ratio * z_one / f.noise_multiplier  # the ratio is proportional to z
        fixes.append(f"fewer {f.release_name}s: {key} = 1 lowers z to {z_one:.4g} and gives ratio {ratio_one:.4g}"
                     + (", which passes" if ratio_one <= f.threshold else
                        f": {f.releases} {f.release_name}s at z compose about like one at z/sqrt({f.releases}), so "
                        f"fewer {f.release_name}s do not lift this bound"))
    else:
        fixes.append(f"fewer {f.release_name}s do not help: this is {key} = {f.releases} already"
                     if f.releases == 1 else f"fewer {f.release_name}s lower z only with a calibrated noise-multiplier")
    fixes.append("max-noise-to-signal = inf runs it anyway (research only: the published adapter will be mostly noise)")
    raise ValueError(
        f"refusing to start: this private run cannot carry signal. {f.figures[0].upper()}{f.figures[1:]}; the "
        f"published adapter's noise is {f.ratio_over_releases:.4g} times its largest possible signal, above "
        f"max-noise-to-signal = {f.threshold:g}. Alternatives:\n  - " + "\n  - ".join(fixes)
        + f"\nNothing was sent to any site; nothing was charged.{' ' + f.note if f.note else ''}"
    )
