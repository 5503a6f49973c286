"""Tests of common/dp/ledger.py: the privacy ledger saved with a run and restored from it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import common.dp.ledger as ledger_module
from common.dp.accounting import ACCOUNTANTS
from common.dp.ledger import LEDGER_VERSION, PrivacyLedger
from common.dp.mechanism import PrivacyEvent

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")


def sample_ledger() -> PrivacyLedger:
    ledger = PrivacyLedger(delta=1e-5)
    ledger.record(PrivacyEvent(noise_multiplier=2.0, sample_rate=0.01, steps=100, unit="record", label="TI release"))
    ledger.record(PrivacyEvent(noise_multiplier=1.5, sample_rate=1.0, steps=1, unit="site", sampling="none", label="round 1"))
    ledger.record(PrivacyEvent(noise_multiplier=1.5, sample_rate=1.0, steps=1, unit="site", sampling="none", label="round 2"))
    return ledger


def test_save_load_round_trip(tmp_path: Path) -> None:
    ledger = sample_ledger()
    path = tmp_path / "privacy" / "ledger.json"  # parent folder created on save
    ledger.save(path)
    restored = PrivacyLedger.load(path)
    assert restored == ledger
    assert restored.units() == ["record", "site"]
    for unit in restored.units():
        for name in ACCOUNTANTS:
            assert restored.epsilon(unit, name) == ledger.epsilon(unit, name)
    assert restored.summary() == ledger.summary()


def test_epsilon_is_per_unit() -> None:
    ledger = sample_ledger()
    site_only = PrivacyLedger(delta=1e-5, events=[e for e in ledger.events if e.unit == "site"])
    assert ledger.epsilon("site", "rdp") == site_only.epsilon("site", "rdp")
    assert ledger.epsilon("record", "rdp") < ledger.epsilon("site", "rdp")


def test_summary_maps_inf_to_none_and_is_strict_json() -> None:
    ledger = sample_ledger()
    ledger.record(PrivacyEvent(noise_multiplier=0.0, sample_rate=0.01, unit="record", label="non-private"))
    summary = ledger.summary()
    assert summary["record"] == {name: None for name in ACCOUNTANTS}
    assert all(isinstance(v, float) and math.isfinite(v) for v in summary["site"].values())
    json.dumps(summary, allow_nan=False)  # no Infinity / NaN tokens


def test_summary_rounds_to_six_decimals() -> None:
    summary = sample_ledger().summary()
    for per_unit in summary.values():
        for v in per_unit.values():
            assert v == round(v, 6)


def test_empty_ledger() -> None:
    ledger = PrivacyLedger(delta=1e-5)
    assert ledger.units() == [] and ledger.summary() == {}
    assert ledger.epsilon("record") == 0.0


def test_saved_file_is_strict_json(tmp_path: Path) -> None:
    sample_ledger().save(tmp_path / "ledger.json")
    data = json.loads((tmp_path / "ledger.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert data["version"] == LEDGER_VERSION and data["delta"] == 1e-5 and len(data["events"]) == 3


def test_atomic_save_leaves_no_tmp_files(tmp_path: Path) -> None:
    ledger = sample_ledger()
    path = tmp_path / "ledger.json"
    ledger.save(path)
    ledger.record(PrivacyEvent(noise_multiplier=1.0, sample_rate=1.0, unit="site", sampling="none"))
    ledger.save(path)  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]
    assert len(PrivacyLedger.load(path).events) == 4


def test_failed_save_keeps_old_ledger_and_leaves_no_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger.json"
    sample_ledger().save(path)
    before = path.read_bytes()

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ledger_module.json, "dump", crash)
    bigger = sample_ledger()
    bigger.record(PrivacyEvent(noise_multiplier=1.0, sample_rate=1.0, unit="site", sampling="none"))
    with pytest.raises(OSError, match="disk full"):
        bigger.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


def test_load_rejects_unknown_version(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps({"version": LEDGER_VERSION + 1, "delta": 1e-5, "events": []}))
    with pytest.raises(ValueError, match="version"):
        PrivacyLedger.load(path)


def test_load_rejects_invalid_event(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    bad = PrivacyEvent(noise_multiplier=1.0, sample_rate=0.5).to_dict() | {"sample_rate": 2.0}
    path.write_text(json.dumps({"version": LEDGER_VERSION, "delta": 1e-5, "events": [bad]}))
    with pytest.raises(ValueError, match="sample_rate"):
        PrivacyLedger.load(path)
