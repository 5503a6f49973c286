"""The privacy ledger: every event a run spent, saved with the run and restored from it.

The ledger only records events; epsilons are recomputed from them by the accountants on
demand, so a restored ledger reports exactly what the original did.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from common.dp.accounting import ACCOUNTANTS, epsilon
from common.dp.mechanism import PrivacyEvent

LEDGER_VERSION = 1


@dataclass
class PrivacyLedger:
    """Append-only list of privacy events with the delta the run reports at."""

    delta: float
    events: list[PrivacyEvent] = field(default_factory=list)

    def record(self, event: PrivacyEvent) -> None:
        self.events.append(event)

    def units(self) -> list[str]:
        return sorted({e.unit for e in self.events})

    def epsilon(self, unit: str, accountant: str = "prv") -> float:
        """Epsilon for one unit: events compose within a scope; disjoint scopes compose in
        parallel (McSherry 2009, "Privacy Integrated Queries", Thm. 4), so the worst scope counts."""
        scopes = {e.scope for e in self.events if e.unit == unit}
        return max(
            (epsilon([e for e in self.events if e.unit == unit and e.scope == s], self.delta, accountant)  # type: ignore[arg-type]
             for s in scopes),
            default=0.0,
        )

    def summary(self) -> dict[str, dict[str, float | None]]:
        """``{unit: {accountant: epsilon}}``; JSON has no infinity, so inf becomes None."""
        out: dict[str, dict[str, float | None]] = {}
        for unit in self.units():
            out[unit] = {}
            for name in ACCOUNTANTS:
                eps = self.epsilon(unit, name)
                out[unit][name] = None if math.isinf(eps) else round(eps, 6)
        return out

    def to_dict(self) -> dict:
        return {"version": LEDGER_VERSION, "delta": self.delta, "events": [e.to_dict() for e in self.events]}

    @classmethod
    def from_dict(cls, d: dict) -> "PrivacyLedger":
        if d.get("version") != LEDGER_VERSION:
            raise ValueError(f"unsupported ledger version {d.get('version')!r}")
        return cls(delta=float(d["delta"]), events=[PrivacyEvent.from_dict(e) for e in d["events"]])

    def save(self, path: str | Path) -> None:
        """Write atomically: a crash leaves either the old ledger or the new one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)  # a failed save must not leave its temp file behind
            raise

    @classmethod
    def load(cls, path: str | Path) -> "PrivacyLedger":
        return cls.from_dict(json.loads(Path(path).read_text()))
