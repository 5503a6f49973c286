"""The audit command on a run folder's privacy.json."""

from __future__ import annotations

import json

import pytest

from common.dp.mechanism import PrivacyEvent
from simulations.audit import main


def test_audit_command_writes_audit_json(tmp_path):
    event = PrivacyEvent(noise_multiplier=1.0, sample_rate=1.0, steps=2, unit="site").to_dict()
    (tmp_path / "privacy.json").write_text(json.dumps({"clip_norm": 0.1, "delta": 1e-5, "events": [event]}))
    main([str(tmp_path), "-o", str(tmp_path / "audit.json"), "--canaries", "200", "--guesses-in", "50",
          "--guesses-out", "50", "--background", "10"])
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert audit["unit"] == "site" and audit["details"]["rounds"] == 2 and audit["noise"] is True
    assert 0 <= audit["epsilon_lower_bound"] <= audit["accountant_epsilon"]


def test_audit_command_names_a_missing_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nothing")])
    assert "privacy.json not found" in capsys.readouterr().err
