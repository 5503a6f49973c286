"""What every privadapt strategy shares: one round loop, a privacy ledger saved after every
change, no federated evaluation, and (for secure aggregation) the round's secure sum held
between ``configure_train``, which runs the protocol, and ``aggregate_train``, which releases it.

The round loop replaces Flower's ``Strategy.start`` (which also runs a federated evaluation we
never use) with three seams: where the loop starts (:meth:`LedgerStrategy.first_round`), how
the replies come back (:meth:`LedgerStrategy.receive`) and what happens once a round is
complete (:meth:`LedgerStrategy.end_round`)."""

from __future__ import annotations

from pathlib import Path
import logging
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from common.dp import PrivacyLedger
from server.aggregation import SecureRound
from server.streaming import ReceiveStats, stream_replies

log = logging.getLogger("privadapt.server")


class LedgerStrategy(Strategy):
    """Base of the DPAgg-TI, DP-SGD TI and DP-FedAvg LoRA strategies."""

    def __init__(self, *, ledger: PrivacyLedger, ledger_path: Path | None) -> None:
        self.ledger = ledger
        self.ledger_path = ledger_path
        self.secure: SecureRound | None = None
        self.receive_stats = ReceiveStats()  # the latest round's (see server.streaming)

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
        """The round the loop starts at (1 for a fresh run)."""
        return 1

    def receive(self, grid: Grid, messages: Iterable[Message], timeout: float) -> Iterable[Message]:
        """Send the round's messages and yield the replies one at a time as they arrive
        (:mod:`server.streaming`): ``aggregate_train`` consumes them once, so the server
        never holds more than a few replies whatever the number of sites."""
        self.receive_stats = ReceiveStats()
        return stream_replies(grid, messages, timeout, stats=self.receive_stats)

    def end_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """Called once a round's release is complete and recorded."""

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
        for server_round in range(self.first_round(), num_rounds + 1):
            log.info("[ROUND %d/%d]", server_round, num_rounds)
            messages = self.configure_train(server_round, arrays, train_config, grid)
            new_arrays, metrics = self.aggregate_train(server_round, self.receive(grid, messages, timeout))
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            if metrics is not None:
                log.info("round %d: %s", server_round, metrics)
                result.train_metrics_clientapp[server_round] = metrics
            self.end_round(server_round, arrays)
        return result

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
