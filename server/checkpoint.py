"""Durable run state: one checkpoint file, written atomically after every complete round.

The checkpoint holds everything the server needs to go on from the last complete round as if
it had never stopped: the round index, the strategy's state (global adapter or releases so
far, round logs; the noise and sampling generators' states only with privacy-randomness =
"seeded-insecure", None with the OS CSPRNG), the privacy ledger, the plan's (z, q) and a
fingerprint of the run config. Ledger and state live in the SAME file, so they are committed
together: a crash leaves either the previous round's checkpoint or this one, never a ledger
that disagrees with the adapter.

Writing: a temporary file in the same folder, flushed and fsync'd, then ``os.replace`` (atomic
on POSIX) and an fsync of the folder so the rename itself is durable.

What a crash can cost: a round whose release was computed but whose checkpoint was not yet
written is redone on resume. With seeded-insecure randomness the restored generators draw the
same noise again, so the redone round is bit-identical and is counted once. With the OS CSPRNG
(the default) the redone round draws fresh noise and a fresh sample; the lost release was held
only in the crashed process' memory (the adapter and privacy report are exported at the end of
the run), so it was never published and is not counted.

Loading uses ``torch.load(weights_only=True)``: tensors and plain containers only, no pickle
code execution from a file in the output folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from common.dp import PrivacyLedger

log = logging.getLogger("privadapt.server")

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_VERSION = 1

# Keys that may change between a run and its resumption without changing what the rounds
# compute: where and how to resume, the number of rounds the server runs (a longer run goes
# on: a calibrated z changes with it, and the plan's (z, q), record-level ones included, are
# compared separately; a fixed z meets the budget check before every release, which stops the
# run before it passes the target), and what is done after the last round (samples) or where
# (device: results may then differ in the last bits). ``dpsgd-rounds`` is fingerprinted: it
# sets the total steps every SITE calibrates its own DP-SGD noise and its own accountant for,
# outside the server's checkpoint, so changing it on resume would change what the sites spend.
# ``max-noise-to-signal`` only decides whether a run may start (common.dp.plan.signal_to_noise):
# a resumed run is checked again, and a checkpoint from before the key existed stays resumable.
NOT_FINGERPRINTED = frozenset({
    "resume", "output-dir", "rounds", "num-releases", "device",
    "sample-prompts", "sample-steps", "sample-guidance", "round-timeout", "max-noise-to-signal",
})


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (another run's, or unreadable)."""


def config_fingerprint(run_config: Mapping[str, Any]) -> str:
    """SHA-256 of the run config's keys that decide what the rounds compute."""
    kept = {k: v for k, v in sorted(run_config.items()) if k not in NOT_FINGERPRINTED}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Checkpoint:
    """The state after round ``completed_round``."""

    fingerprint: str
    completed_round: int
    plan: dict[str, float]  # the noise multiplier and sampling rate every release used
    ledger: PrivacyLedger
    strategy: dict[str, Any]

    def to_payload(self) -> dict[str, Any]:
        return {"version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint, "completed_round": self.completed_round,
                "plan": dict(self.plan), "ledger": json.dumps(self.ledger.to_dict()), "strategy": self.strategy}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], path: Path) -> "Checkpoint":
        if not isinstance(payload, Mapping) or payload.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"{path}: not a privadapt checkpoint of version {CHECKPOINT_VERSION}")
        try:
            return cls(fingerprint=str(payload["fingerprint"]), completed_round=int(payload["completed_round"]),
                       plan={k: float(v) for k, v in payload["plan"].items()},
                       ledger=PrivacyLedger.from_dict(json.loads(payload["ledger"])), strategy=dict(payload["strategy"]))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: malformed checkpoint ({err})") from None


def atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, rename it over
    ``path`` and fsync the folder: a crash leaves the old file or the new one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class CheckpointStore:
    """Reads and writes the checkpoint of one run in its output folder.

    Args:
        folder: the run's output folder.
        fingerprint: :func:`config_fingerprint` of this run's config.
        plan: the plan's ``noise_multiplier`` and ``sample_rate``; a checkpoint made under another
            plan (for instance more rounds with a calibrated noise multiplier) is refused.
        resume: ``"auto"`` resumes from a matching checkpoint, ``"never"`` refuses to start over
            an existing one (delete it, or choose another output-dir).
    """

    def __init__(self, folder: Path, *, fingerprint: str, plan: Mapping[str, float], resume: str = "auto") -> None:
        if resume not in ("auto", "never"):
            raise ValueError(f"resume must be 'auto' or 'never', got {resume!r}")
        self.path = Path(folder) / CHECKPOINT_FILE
        self.fingerprint = fingerprint
        self.plan = {k: float(v) for k, v in plan.items()}
        self.resume = resume

    def load(self) -> Checkpoint | None:
        """The checkpoint to resume from, None for a fresh run; a checkpoint of another run
        config or plan is a :class:`CheckpointError`, never a silent restart."""
        if not self.path.exists():
            return None
        if self.resume == "never":
            raise CheckpointError(f"{self.path} exists and resume = 'never': delete it or use another output-dir")
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a truncated or foreign file
            raise CheckpointError(f"{self.path}: cannot read the checkpoint ({type(err).__name__}: {err})") from None
        ckpt = Checkpoint.from_payload(payload, self.path)
        if ckpt.fingerprint != self.fingerprint:
            raise CheckpointError(
                f"{self.path} was written by a run with another config (fingerprint {ckpt.fingerprint[:12]} != "
                f"{self.fingerprint[:12]}); only rounds, num-releases, device, round-timeout and the "
                "sample-* keys may change on resume. Use another output-dir for a new run.")
        if ckpt.plan != self.plan:
            raise CheckpointError(
                f"{self.path}: the checkpointed releases used plan {ckpt.plan}, this run plans {self.plan} (a "
                "calibrated noise multiplier changes with the number of rounds): set noise-multiplier to "
                f"{ckpt.plan.get('noise_multiplier')} to go on with the same noise")
        log.info("resuming from %s: round %d complete, %d privacy event(s) in the ledger", self.path,
                 ckpt.completed_round, len(ckpt.ledger.events))
        return ckpt

    def save(self, completed_round: int, ledger: PrivacyLedger, strategy_state: dict[str, Any]) -> None:
        ckpt = Checkpoint(self.fingerprint, completed_round, self.plan, ledger, strategy_state)
        atomic_write(self.path, lambda f: torch.save(ckpt.to_payload(), f))
