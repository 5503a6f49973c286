"""What every privadapt strategy shares: one round loop, a privacy ledger saved after every
change, no federated evaluation, and (for secure aggregation) the round's secure sum held
between ``configure_train``, which runs the protocol, and ``aggregate_train``, which releases it.

The round loop replaces Flower's ``Strategy.start`` (which also runs a federated evaluation we
never use) with three seams: where the loop starts (:meth:`LedgerStrategy.first_round`), how
the replies come back (:meth:`LedgerStrategy.receive`) and what happens once a round is
complete (:meth:`LedgerStrategy.end_round`).

Reliability (:class:`RunControl`): ``first_round`` resumes from the run's checkpoint,
``end_round`` writes one after every complete round (:mod:`server.checkpoint`); before every
round attempt the privacy budget of every unit is checked with the events the attempt would
spend, and the run stops before spending if the ledger would pass a target
(:class:`BudgetExceeded`), as it does when more sites are connected than the run declared
(:class:`TooManySites`, raised by ``configure_train``); a stopped run keeps everything already
released and accounted, and privacy.json says why it stopped. A round with fewer valid
contributions than ``min-sites`` is charged, not applied, and retried (``short-round = retry``)
while the run's retry allowance lasts."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from common.config import RunConfig
from common.dp import BudgetCheck, PrivacyEvent, PrivacyLedger, epsilon
from common.dp.plan import EACH_SITE
from server.aggregation import SecureRound
from server.checkpoint import CheckpointStore, config_fingerprint
from server.streaming import ReceiveStats, stream_replies

log = logging.getLogger("privadapt.server")


SHORT_ROUND_POLICIES = ("skip", "retry")


class RunStopped(RuntimeError):
    """The run must stop before the next round attempt spends anything; what was released and
    accounted before stays (the round loop returns, the run exports it, privacy.json says why)."""


class BudgetExceeded(RunStopped):
    """The next release would take the ledger past the target epsilon: nothing was spent."""


class TooManySites(RunStopped):
    """More sites are connected than the run declared (``num-sites``): the public K the
    denominator and the guarantee rest on would be wrong, so nothing is released."""


@dataclass(frozen=True)
class RunControl:
    """How the round loop resumes, enforces the budget and treats short rounds.

    Args:
        checkpoint: where the run state is saved after every round (None: not saved).
        target_epsilon: the budget of ``unit`` (inf: not enforced, e.g. non-private runs).
        other_targets: ``(unit, target)`` pairs for the run's other units (the record level
            of LoRA with DP-SGD sites); a unit with no target is not enforced.
        delta: the delta the budget is checked at; ``accountant`` the accountant checked (PRV,
            the headline one the plan is calibrated with).
        min_sites: a round with fewer valid contributions is short (0: never short).
        short_round: ``"skip"`` leaves a short round's update out; ``"retry"`` also runs the
            round again with a fresh sample, at most ``max_retries`` times over the whole run.
    """

    checkpoint: CheckpointStore | None = None
    target_epsilon: float = math.inf
    delta: float = 1e-5
    unit: str = "site"
    accountant: str = "prv"
    min_sites: int = 0
    short_round: str = "skip"
    max_retries: int = 0
    other_targets: tuple[tuple[str, float], ...] = ()

    def target_for(self, unit: str) -> float:
        """The target epsilon of ``unit`` (inf: not enforced)."""
        return self.target_epsilon if unit == self.unit else dict(self.other_targets).get(unit, math.inf)

    def __post_init__(self) -> None:
        if self.short_round not in SHORT_ROUND_POLICIES:
            raise ValueError(f"short_round must be one of {SHORT_ROUND_POLICIES}, got {self.short_round!r}")
        if self.min_sites < 0 or self.max_retries < 0:
            raise ValueError("min_sites and max_retries must be >= 0")


def run_control(cfg: RunConfig, out: Path, *, plan: Mapping[str, float], unit: str,
                other_targets: Mapping[str, float] | None = None) -> RunControl:
    """The :class:`RunControl` of a run: its checkpoint in ``out``, its budgets and short-round policy."""
    store = CheckpointStore(out, fingerprint=config_fingerprint(cfg.to_run_config()), plan=plan, resume=cfg.resume)
    others = tuple((other_targets or {}).items()) if cfg.private else ()
    return RunControl(checkpoint=store, target_epsilon=cfg.target_epsilon if cfg.private else math.inf,
                      delta=cfg.target_delta, unit=unit, min_sites=cfg.min_sites, short_round=cfg.short_round,
                      max_retries=cfg.max_retries, other_targets=others)


def reliability_report(strategy: "LedgerStrategy") -> dict:
    """What privacy.json says about resumption, early stops and retries."""
    return {"resumed_after_round": strategy.resumed_from or None, "stopped_early": strategy.stopped,
            "retries_used": strategy.retries_used}


class LedgerStrategy(Strategy):
    """Base of the DPAgg-TI, DP-SGD TI and DP-FedAvg LoRA strategies.

    Subclasses provide :meth:`state_dict` / :meth:`load_state_dict` (what a checkpoint keeps),
    :meth:`current_arrays` (the global state handed to ``configure_train`` after a resume) and
    :meth:`next_event` (the privacy event a round attempt would spend, for the budget check).
    """

    def __init__(self, *, ledger: PrivacyLedger, ledger_path: Path | None, control: RunControl | None = None) -> None:
        self.ledger = ledger
        self.ledger_path = ledger_path
        self.secure: SecureRound | None = None
        self.control = control or RunControl()
        self.stopped: str | None = None  # why the run stopped before its last round
        self.resumed_from: int = 0  # the last complete round of the checkpoint resumed from
        self.retries_used = 0
        self.short = False  # set by aggregate_train: this attempt had too few valid contributions
        self.receive_stats = ReceiveStats()  # the latest round's (see server.streaming)

    # ---- what subclasses provide ------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} cannot be checkpointed")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be resumed")

    def current_arrays(self) -> ArrayRecord:
        raise NotImplementedError(f"{type(self).__name__} cannot be resumed")

    def next_event(self, server_round: int) -> PrivacyEvent | None:
        """The event the next round attempt would spend (None: nothing the server can check)."""
        return None

    def next_events(self, server_round: int) -> list[PrivacyEvent]:
        """Every event the next round attempt would spend, one per unit (default: :meth:`next_event`).
        An event of scope :data:`~common.dp.plan.EACH_SITE` is spent by each site in its own scope."""
        event = self.next_event(server_round)
        return [] if event is None else [event]

    # ---- reliability --------------------------------------------------------------------
    def is_short(self, valid: int) -> bool:
        """Whether ``valid`` contributions make a short round (recorded in :attr:`short`)."""
        self.short = valid < self.control.min_sites
        return self.short

    def spent_histories(self, event: PrivacyEvent) -> list[list[PrivacyEvent]]:
        """The ledger histories ``event`` would compose with: its own scope's, or for an
        :data:`~common.dp.plan.EACH_SITE` event every site scope's (distinct ones once; a first
        round has one empty history)."""
        same_unit = [e for e in self.ledger.events if e.unit == event.unit]
        if event.scope != EACH_SITE:
            return [[e for e in same_unit if e.scope == event.scope]]
        by_scope: dict[str, list[PrivacyEvent]] = {}
        for e in same_unit:
            by_scope.setdefault(e.scope, []).append(e)
        distinct = {tuple(sorted((e.noise_multiplier, e.sample_rate, e.steps) for e in h)): h for h in by_scope.values()}
        return list(distinct.values()) or [[]]

    def check_budget(self, server_round: int) -> None:
        """Raise :class:`BudgetExceeded` if the ledger plus the next attempt's events would pass
        a unit's target epsilon (:class:`~common.dp.budget.BudgetCheck`, with the same accountant
        the plan is calibrated with; per-site events against the most-spent site)."""
        acc, delta = self.control.accountant, self.control.delta
        for event in self.next_events(server_round):
            target = self.control.target_for(event.unit)
            checks = [BudgetCheck(h, [event], target, delta, acc)  # type: ignore[arg-type]
                      for h in self.spent_histories(event)]
            if not any(check.over for check in checks):
                continue
            worst = max(checks, key=lambda check: check.epsilon)
            before = epsilon(worst.spent, delta, acc)  # type: ignore[arg-type]
            raise BudgetExceeded(
                f"round {server_round}: stopping before it spends: its release (z={event.noise_multiplier:g}, "
                f"q={event.sample_rate:g}) would take the {event.unit}-level epsilon from {before:.4f} to "
                f"{worst.epsilon:.4f} ({acc.upper()}, delta {delta:g}), above target-epsilon {target:g}")

    def restore(self) -> int:
        """Load the run's checkpoint, if any, into the strategy and the ledger; return the
        last complete round (0 for a fresh run)."""
        store = self.control.checkpoint
        ckpt = store.load() if store is not None else None
        if ckpt is None:
            return 0
        if ckpt.ledger.delta != self.ledger.delta:
            raise ValueError(f"the checkpoint's ledger is at delta {ckpt.ledger.delta}, this run at {self.ledger.delta}")
        lost = self.lost_releases(ckpt.ledger)
        self.ledger.events[:] = ckpt.ledger.events  # in place: the app holds the same ledger
        for event in self.charged_though_lost(lost):
            self.ledger.record(event.noted("lost in a crash, seen by an untrusted server: charged"))
        state = dict(ckpt.strategy)
        self.retries_used = int(state.pop("retries_used", 0))
        self.load_state_dict(state)
        self.resumed_from = ckpt.completed_round
        self.save_ledger()  # ledger.json may hold a release the crash kept out of the checkpoint
        return ckpt.completed_round

    def lost_releases(self, checkpointed: PrivacyLedger) -> list[PrivacyEvent]:
        """The events ``ledger.json`` holds beyond the checkpoint's: releases (or attempts) of
        the round a crash interrupted before its checkpoint."""
        if self.ledger_path is None or not self.ledger_path.exists():
            return []
        saved = PrivacyLedger.load(self.ledger_path).events
        kept = checkpointed.events
        return list(saved[len(kept):]) if saved[:len(kept)] == kept else []

    def charged_though_lost(self, lost: list[PrivacyEvent]) -> list[PrivacyEvent]:
        """Which lost events stay charged when the interrupted round is redone.

        A release whose noise the server adds was held only by the crashed server process and
        never published (adapters and reports are exported at the end): the server is trusted
        with it, so it is not counted, and the redone round draws fresh noise. A release whose
        noise the sites add (distributed noise shares, DP-SGD) was seen by a server the
        guarantee does not trust, so it stays charged. The default is the trusted case;
        strategies whose noise comes from the sites say so."""
        return []

    def save_ledger(self) -> None:
        """Write the ledger atomically (kept with the run; restored from it)."""
        if self.ledger_path is not None:
            self.ledger.save(self.ledger_path)

    def take_secure(self, server_round: int) -> SecureRound:
        """The secure sum ``configure_train`` formed for this round (handed over once)."""
        secure, self.secure = self.secure, None
        if secure is None or secure.round != server_round:
            raise RuntimeError(f"round {server_round}: no secure-aggregation result (configure_train did not run)")
        return secure

    def first_round(self) -> int:
        """The round the loop starts at: 1 for a fresh run, the one after the checkpoint's last
        complete round when resuming."""
        return self.restore() + 1

    def receive(self, grid: Grid, messages: Iterable[Message], timeout: float) -> Iterable[Message]:
        """Send the round's messages and yield the replies one at a time as they arrive
        (:mod:`server.streaming`): ``aggregate_train`` consumes them once, so the server
        never holds more than a few replies whatever the number of sites."""
        self.receive_stats = ReceiveStats()
        return stream_replies(grid, messages, timeout, stats=self.receive_stats)

    def end_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """Called once a round's release is complete and recorded: checkpoint it (state and
        ledger in one atomic write)."""
        if self.control.checkpoint is not None:
            self.control.checkpoint.save(server_round, self.ledger, {**self.state_dict(), "retries_used": self.retries_used})

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn=None) -> Result:
        """Run rounds ``first_round() .. num_rounds``: configure, receive, aggregate, end."""
        if evaluate_config is not None or evaluate_fn is not None:
            raise ValueError("privadapt strategies run no federated or central evaluation")
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        result = Result(arrays=initial_arrays)
        arrays = initial_arrays
        started = time.monotonic()
        first = self.first_round()
        if first > 1:
            arrays = result.arrays = self.current_arrays()
        for server_round in range(first, num_rounds + 1):
            # through Flower's logger: `flwr run --stream` shows it, and the deployment tools time rounds by it
            flwr_log(logging.INFO, "[ROUND %d/%d]", server_round, num_rounds)
            while True:
                self.short = False
                try:
                    self.check_budget(server_round)
                    messages = self.configure_train(server_round, arrays, train_config, grid)
                except RunStopped as err:
                    self.stopped = str(err)
                    log.error("%s", err)
                    return result
                replies = self.receive(grid, messages, timeout)
                del messages  # Instructions build messages while pushed; the loop keeps none (server.sites)
                new_arrays, metrics = self.aggregate_train(server_round, replies)
                if not (self.short and self.control.short_round == "retry" and self.retries_used < self.control.max_retries):
                    break
                self.retries_used += 1
                log.warning("round %d: short round (fewer than %d valid sites): retry %d of %d", server_round,
                            self.control.min_sites, self.retries_used, self.control.max_retries)
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            if metrics is not None:
                log.info("round %d: %s", server_round, metrics)
                result.train_metrics_clientapp[server_round] = metrics
            self.end_round(server_round, arrays)
        # Flower's own closing line (its Strategy.start logs it): the deployment tools end the last round at it
        flwr_log(logging.INFO, "Strategy execution finished in %.2fs", time.monotonic() - started)
        return result

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
