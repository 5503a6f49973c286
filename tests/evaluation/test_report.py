"""The run report renders what the evaluation files hold, and "not run" for what is missing."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from common.dp import PrivacyEvent, PrivacyLedger
from evaluation.report import render_run_report
from server.statement import PrivacyFacts, privacy_statement


def lora_privacy() -> dict:
    events = [PrivacyEvent(noise_multiplier=1.5, sample_rate=1.0, unit="site", label=f"dp-fedavg lora round {r}")
              for r in (1, 2)]
    summary = PrivacyLedger(delta=1e-5, events=events).summary()
    facts = PrivacyFacts(private=True, units=("site",), epsilon=summary, delta=1e-5,
                         adjacency={"site": "add/remove one site"}, aggregation="central", noise_by="server",
                         randomness_secret=True, diagnostics=None, contribution="clipped delta",
                         empirical_defense="SMP-LORA")
    return {"method": "dp-fedavg-lora", "defense": "smp-lora", "private": True, "delta": 1e-5, "target_epsilon": 5.0,
            "adjacency": "add/remove one site", "epsilon": summary, "events": [e.to_dict() for e in events],
            **privacy_statement(facts, "This LoRA adapter")}


def attack(name: str, auc: float, applicable: bool = True) -> dict:
    if not applicable:
        return {"name": name, "applicable": False, "reason": "needs the model's own text embedding", "auc": None}
    return {"name": name, "applicable": True, "reason": None, "auc": auc, "auc_ci": [auc - 0.1, auc + 0.1],
            "balanced_accuracy": 0.61, "tpr_at_fpr": {"0.01": {"tpr": 0.05, "ci": [0.01, 0.2]},
                                                       "0.001": {"tpr": 0.0, "ci": [0.0, 0.1]}},
            "epsilon_heuristic": 0.42, "roc": {"fpr": [0.0, 0.0, 0.25, 1.0], "tpr": [0.0, 0.25, 0.75, 1.0]},
            "details": {}}


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "privacy.json").write_text(json.dumps(lora_privacy()))
    return run


def test_missing_evaluations_say_not_run(run_dir, tmp_path):
    text = render_run_report(run_dir, tmp_path / "ev").read_text()
    assert "one site" in text and "SMP-LORA" in text
    assert text.count("Not run") == 3  # attacks, audit, utility
    assert (tmp_path / "ev" / "epsilon_rounds.png").is_file()
    # the last round's epsilon, recomputed from the ledger events, is the run's own
    assert f"| 2 | {lora_privacy()['epsilon']['site']['prv']:.3f} |" in text and "agrees with privacy.json" in text


def test_a_ledger_that_disagrees_with_the_reported_epsilon_is_flagged(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    privacy = lora_privacy()
    privacy["epsilon"]["site"]["prv"] = 1.0
    (run / "privacy.json").write_text(json.dumps(privacy))
    assert "disagrees with privacy.json" in render_run_report(run, tmp_path / "ev").read_text()


def test_attack_table_roc_and_audit_line(run_dir, tmp_path):
    ev = tmp_path / "ev"
    ev.mkdir()
    attacks = {"run": str(run_dir), "adapter": "lora", "members": 24, "non_members": 24,
               "attacks": [attack("loss", 0.71), attack("pia", 0.0, applicable=False)],
               "site_inference": [attack("site loss", 0.55)]}
    (ev / "attacks.json").write_text(json.dumps(attacks))
    audit = {"method": "steinke-nasr-jagielski-2023", "canaries": 100, "guesses": 20, "correct": 19, "confidence": 0.95,
             "delta": 1e-5, "epsilon_lower_bound": 1.25, "accountant_epsilon": 3.1, "noise": True, "unit": "site"}
    (ev / "audit.json").write_text(json.dumps(audit))
    text = render_run_report(run_dir, ev).read_text()
    assert "| loss | 0.710 [0.610, 0.810] | 0.610 | 0.050 [0.010, 0.200] | 0.000 [0.000, 0.100] | 0.42 |" in text
    assert "| epsilon heuristic (not a bound) |" in text and "epsilon lower bound |" not in text
    assert "NOT a lower bound" in text
    assert "| pia | not applicable: needs the model's own text embedding |" in text
    assert "| site loss | 0.550" in text
    assert "100 canaries" in text and "epsilon >= 1.25" in text and "stays below the accountant's epsilon" in text
    assert Image.open(ev / "roc.png").format == "PNG"
    assert text.count("Not run") == 1  # utility only


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no privacy.json"):
        render_run_report(tmp_path, tmp_path / "ev")


def test_the_report_says_which_attacks_the_defence_never_saw(run_dir, tmp_path):
    from evaluation.attacks import defense_exposure

    records = [attack("loss", 0.71), attack("pia", 0.6), attack("proxy-h", 0.52)]
    exposure = defense_exposure("smp-lora", records)
    assert exposure == {"defense": "smp-lora", "trained_against": ["proxy-h"], "never_seen": ["loss", "pia"]}
    assert defense_exposure("none", records) is None and defense_exposure("dp-sgd", records) is None
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "attacks.json").write_text(json.dumps({"adapter": "lora", "members": 24, "non_members": 24, "attacks": records,
                                                 "site_inference": [], "defense_exposure": exposure}))
    text = render_run_report(run_dir, ev).read_text()
    assert "The run's defence (smp-lora)" in text and "trained against proxy-h" in text
    assert "never saw loss, pia." in text
