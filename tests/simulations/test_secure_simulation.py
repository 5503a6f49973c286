"""Secure aggregation and distributed noise end to end through Flower's simulation engine."""

from __future__ import annotations

import json
import shutil

import pytest

from common.config import RunConfig, pyproject_run_config
from common.paths import REPO_ROOT
from tests.simulation_process import simulate


def test_dpagg_with_distributed_noise_survives_a_failing_site(tmp_path, tiny_sd_path):
    """Site 2 has no data folder: it refuses at the setup stage, the secure sum goes on with
    sites 0 and 1, each adding its share of the noise; the ledger holds the achieved z.
    (A folder of broken images would not fail: they are left out, and the site sends the sum
    of no image, see tests/privacy/test_record_faults.py.)"""
    data = tmp_path / "data"
    for index in range(2):
        shutil.copytree(REPO_ROOT / "data/demo" / f"site-{index}", data / f"site-{index}")
    overrides = {"ti-steps": 2, "sample-steps": 2, "sample-prompts": "an emoji of a cat", "dataset-size": 24,
                 "aggregation": "distributed", "model-path": str(tiny_sd_path), "data-path": str(data),
                 "output-dir": str(tmp_path / "out")}
    out = simulate(3, overrides)
    cfg = RunConfig.from_run_config({**pyproject_run_config(), **overrides})
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["aggregation"] == "distributed" and privacy["num_sites"] == 2
    assert privacy["sites_per_release"] == [2]
    assert [r["reason"] for r in privacy["rejected_replies"]] == ["dropped out of secure aggregation"]  # generic
    # both sites that entered the masking stage survived it: the full noise is there
    assert privacy["achieved_noise_multipliers"] == [pytest.approx(privacy["noise_multiplier"])]
    assert 0 < privacy["epsilon"]["prv"] <= cfg.target_epsilon
    assert "distributed noise" in privacy["trust_model"] and "on each site" in privacy["noise_source"]
    assert (out / "learned_embeds.safetensors").exists()


def test_lora_with_secure_aggregation(tmp_path, tiny_sd_path):
    overrides = {"adapter": "lora", "aggregation": "secure", "rounds": 2, "local-steps": 2, "lora-batch-size": 2,
                 "num-sites": 2, "site-diagnostics": True,  # opted in, yet a secure-mode site sends none
                 "lora-rank": 2, "lora-alpha": 2.0, "sample-steps": 2, "sample-prompts": "an emoji of a cat",
                 "model-path": str(tiny_sd_path), "output-dir": str(tmp_path / "out"),
                 # mechanics, not utility: site-level DP over 2 sites carries no signal (common.dp.plan.signal_to_noise)
                 "max-noise-to-signal": "inf"}
    out = simulate(2, overrides)
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["aggregation"] == "secure" and privacy["num_rounds"] == 2
    assert 0 < privacy["epsilon"]["site"]["prv"] <= 1.0
    rounds = json.loads((out / "round_metrics.json").read_text())
    assert [r["sites_used"] for r in rounds] == [2, 2]
    assert all(r["expected_noise_norm_of_mean"] > 0 and "adaptation_loss" not in r for r in rounds)  # no diagnostics sent
    assert privacy["site_diagnostics"] is False
    assert (out / "pytorch_lora_weights.safetensors").exists()
