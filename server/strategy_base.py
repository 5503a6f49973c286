"""What every privadapt strategy shares: a privacy ledger saved after every change, no
federated evaluation, and (for secure aggregation) the round's secure sum held between
``configure_train``, which runs the protocol, and ``aggregate_train``, which releases it."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.dp import PrivacyLedger
from server.aggregation import SecureRound


class LedgerStrategy(Strategy):
    """Base of the DPAgg-TI, DP-SGD TI and DP-FedAvg LoRA strategies."""

    def __init__(self, *, ledger: PrivacyLedger, ledger_path: Path | None) -> None:
        self.ledger = ledger
        self.ledger_path = ledger_path
        self.secure: SecureRound | None = None

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

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
