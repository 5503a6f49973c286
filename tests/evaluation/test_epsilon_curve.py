"""Epsilon after each round, recomputed from ledger events."""

from __future__ import annotations

import pytest

from common.dp import PrivacyEvent, PrivacyLedger
from evaluation.epsilon_curve import epsilon_by_round


def lora_privacy(rounds: int, z: float = 1.2, q: float = 1.0) -> dict:
    events = [PrivacyEvent(noise_multiplier=z, sample_rate=q, unit="site", label=f"dp-fedavg lora round {r}")
              for r in range(1, rounds + 1)]
    # DP-SGD record events inside two sites: disjoint scopes, composed in parallel
    events += [PrivacyEvent(noise_multiplier=1.0, sample_rate=0.5, unit="record", scope=f"site-{s}",
                            label=f"dp-sgd round {r} (node {s})") for r in range(1, rounds + 1) for s in (0, 1)]
    return {"delta": 1e-5, "events": [e.to_dict() for e in events]}, events


def test_curve_grows_and_ends_at_the_ledger_epsilon():
    privacy, events = lora_privacy(2)
    curve = epsilon_by_round(privacy)
    assert curve["rounds"] == [1, 2]
    ledger = PrivacyLedger(delta=1e-5, events=events)
    for unit in ("site", "record"):
        for acc in ("prv", "rdp"):
            values = curve["curves"][unit][acc]
            assert all(a < b for a, b in zip(values, values[1:]))
            assert values[-1] == pytest.approx(ledger.epsilon(unit, acc))
    # the first round alone is one event per scope
    first = PrivacyLedger(delta=1e-5, events=[e for e in events if "round 1" in e.label and e.unit == "site"])
    assert curve["curves"]["site"]["prv"][0] == pytest.approx(first.epsilon("site"))


def test_no_noise_is_infinite_and_bad_input_is_named():
    privacy = {"delta": 1e-5, "events": [PrivacyEvent(noise_multiplier=0.0, sample_rate=1.0, label="round 1").to_dict()]}
    assert epsilon_by_round(privacy)["curves"]["record"]["prv"] == [None]
    with pytest.raises(ValueError, match="delta"):
        epsilon_by_round({"events": []})
    with pytest.raises(ValueError, match="malformed ledger event"):
        epsilon_by_round({"delta": 1e-5, "events": [{"noise_multiplier": 1.0, "sample_rate": 2.0}]})
