"""Epsilon after each round: the running privacy spend, recomputed from a run's ledger events.

``privacy.json`` lists every event the run spent (``events``; the same as ``ledger.json``),
each labelled with the round or release it belongs to ("dp-fedavg lora round 3", "dpagg-ti
release 1", "dp-sgd round 2 (node 7)"). The epsilon after round r is the ledger's epsilon of
the events of rounds 1..r, from the same accountants (:mod:`common.dp.accounting`) and the
same composition rules (:class:`common.dp.PrivacyLedger`: events compose within a scope,
disjoint scopes in parallel) as the run itself, so the last point equals the reported figure.
"""

from __future__ import annotations

import math
import re

from common.dp import PrivacyLedger
from common.dp.accounting import ACCOUNTANTS
from common.dp.mechanism import PrivacyEvent

_ROUND = re.compile(r"\b(?:round|release)\s+(\d+)\b")


def event_round(event: PrivacyEvent, position: int) -> int:
    """The round an event belongs to, read from its label; unlabelled events count as their
    own round after the labelled ones (``position`` is their 1-based place in the list)."""
    match = _ROUND.search(event.label or "")
    return int(match.group(1)) if match else position


def epsilon_by_round(privacy: dict) -> dict:
    """``{"rounds": [1..R], "delta": d, "curves": {unit: {accountant: [eps after round r]}}}``
    from a run's ``privacy.json``; infinite epsilons become None (JSON has no infinity).

    Raises:
        ValueError: If ``privacy`` has no ``delta`` or malformed events.
    """
    if "delta" not in privacy:
        raise ValueError("privacy.json has no 'delta'")
    try:
        events = [PrivacyEvent.from_dict(e) for e in privacy.get("events", [])]
    except (TypeError, ValueError) as err:
        raise ValueError(f"privacy.json holds a malformed ledger event: {err}") from err
    rounds = [event_round(e, i + 1) for i, e in enumerate(events)]
    unique = sorted(set(rounds))
    curves: dict[str, dict[str, list[float | None]]] = {}
    for unit in sorted({e.unit for e in events}):
        curves[unit] = {name: [] for name in ACCOUNTANTS}
        for r in unique:
            ledger = PrivacyLedger(delta=float(privacy["delta"]),
                                   events=[e for e, k in zip(events, rounds) if k <= r and e.unit == unit])
            for name in ACCOUNTANTS:
                eps = ledger.epsilon(unit, name)
                curves[unit][name].append(None if math.isinf(eps) else eps)
    return {"rounds": unique, "delta": float(privacy["delta"]), "curves": curves}
