"""The canary audit of the production Gaussian sum mechanism: it has power with the noise
off, and stays below the accountant's epsilon with the noise on."""

from __future__ import annotations

import json

import pytest

from common.dp import calibrate_noise_multiplier, epsilon
from common.dp.mechanism import PrivacyEvent
from evaluation.audit import AuditSettings, audit_mechanism, run_audit

DELTA = 1e-5


def test_record_level_noise_off_gives_a_high_bound():
    # 1000 canaries, 500 guesses: all right would give 5.09; the background's cross-talk costs ~1
    result = audit_mechanism(clip_norm=0.5, noise_multiplier=0.0, unit="record", delta=DELTA)
    assert result["noise"] is False and result["accountant_epsilon"] is None
    assert result["correct"] >= 495
    assert result["epsilon_lower_bound"] > 4.0


@pytest.mark.parametrize("target", [1.0, 8.0])
def test_record_level_noise_on_stays_below_the_accountant(target):
    z = calibrate_noise_multiplier(target, DELTA, 1.0)
    result = audit_mechanism(clip_norm=0.5, noise_multiplier=z, unit="record", delta=DELTA)
    # the test's own accountant call: one unsubsampled Gaussian release at z
    accountant = epsilon([PrivacyEvent(noise_multiplier=z, sample_rate=1.0)], DELTA)
    assert result["accountant_epsilon"] == pytest.approx(accountant)
    assert result["epsilon_lower_bound"] <= accountant
    assert result["correct"] > result["guesses"] / 2  # the canaries still show through


def test_site_level_rounds_with_sampling():
    """DP-FedAvg shape: canary sites, 3 rounds at q = 0.5, bounded as trees."""
    off = audit_mechanism(clip_norm=0.1, noise_multiplier=0.0, unit="site", rounds=3, sample_rate=0.5,
                          settings=AuditSettings(canaries=400, guesses_in=100, guesses_out=100, background=20))
    z = 1.3  # about epsilon 4 over the 3 rounds (calibrating it here would cost ~10 s)
    on = audit_mechanism(clip_norm=0.1, noise_multiplier=z, unit="site", rounds=3, sample_rate=0.5,
                         settings=AuditSettings(canaries=400, guesses_in=100, guesses_out=100, background=20))
    accountant = epsilon([PrivacyEvent(noise_multiplier=z, sample_rate=0.5, steps=3, unit="site")], DELTA)
    assert off["epsilon_lower_bound"] > 2.0
    assert on["epsilon_lower_bound"] <= accountant
    assert len(on["details"]["events"]) == 3


def test_run_audit_reads_a_runs_privacy_json(tmp_path):
    event = PrivacyEvent(noise_multiplier=2.5, sample_rate=0.5, unit="record").to_dict()
    (tmp_path / "privacy.json").write_text(json.dumps({"clip_norm": 0.5, "delta": DELTA, "events": [event]}))
    result = run_audit(tmp_path, settings=AuditSettings(canaries=200, guesses_in=50, guesses_out=50))
    assert result["details"]["noise_multiplier"] == 2.5 and result["details"]["sample_rate"] == 0.5
    assert result["run"] == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="privacy.json"):
        run_audit(tmp_path / "missing")


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="guesses_in"):
        AuditSettings(canaries=10, guesses_in=8, guesses_out=8)
