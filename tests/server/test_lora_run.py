"""The signal-to-noise check on the server's real paths (server.lora_run.run_lora,
server.app.run_dpagg): it runs before any message reaches a site, a refused run is charged
nothing, and privacy.json, the model card and the round metrics carry the same figures."""

from __future__ import annotations

import json
import logging
import math

import pytest

from common.config import RunConfig
from common.lora import attach_lora, lora_state, tree_shapes
from common.models import load_pipeline
from common.paths import REPO_ROOT
from common.settings import lora_spec
from server.app import run_dpagg
from server.export import lora_model_card, model_card
from server.lora_run import run_lora
from tests.common.dp.test_plan import EMOJI_SD_LORA, demo_config
from tests.server.grids import ReplayGrid, dpagg_answer, lora_answer

EMOJI_SD = REPO_ROOT / "assets" / "emoji-sd"


def four_sites(tmp_path, **extra) -> RunConfig:
    """Site-level DP-FedAvg over 4 sites at epsilon = 1 on the demo's base model (rank-4 LoRA)."""
    return RunConfig.from_run_config({"adapter": "lora", "num-sites": 4, "rounds": 2, "target-epsilon": 1.0,
                                      "model-path": str(EMOJI_SD), "resolution": 32, "device": "cpu",
                                      "output-dir": str(tmp_path), **extra})


def no_site(message):
    raise AssertionError("a message reached a site")


def test_a_run_that_cannot_carry_signal_is_refused_before_any_site_is_contacted(tmp_path, caplog):
    cfg = four_sites(tmp_path)
    grid = ReplayGrid(4, no_site)
    caplog.set_level(logging.INFO, logger="privadapt.server")
    with pytest.raises(ValueError, match="cannot carry signal") as err:
        run_lora(grid, cfg, tmp_path, load_pipeline(str(EMOJI_SD), device="cpu"))
    assert grid.pushed == 0  # nothing sent
    assert not (tmp_path / "ledger.json").exists() and not (tmp_path / "checkpoint.pt").exists()  # nothing charged
    assert "max-noise-to-signal = inf" in str(err.value) and "sqrt(43008)" in str(err.value)
    assert any("Signal and noise, planned from public settings" in r.getMessage() for r in caplog.records)


def test_the_override_runs_it_and_every_output_carries_the_same_figures(tmp_path, caplog):
    # mechanics, not utility: the override runs what the default refuses
    cfg = four_sites(tmp_path, **{"max-noise-to-signal": "inf", "privacy-randomness": "seeded-insecure"})
    probe = load_pipeline(str(EMOJI_SD), device="cpu")
    spec = lora_spec(cfg)
    attach_lora(probe, spec, seed=0)
    shapes = tree_shapes(lora_state(probe, spec))
    caplog.set_level(logging.INFO, logger="privadapt.server")
    result = run_lora(ReplayGrid(4, lora_answer(shapes, cfg.lora_clip_norm)), cfg, tmp_path,
                      load_pipeline(str(EMOJI_SD), device="cpu"))
    privacy = json.loads(json.dumps(result["privacy"]))  # as privacy.json holds it
    figures = privacy["signal_to_noise"]
    d = privacy["adapter"]["parameters"]
    assert d == figures["dimension"] == EMOJI_SD_LORA
    z, clip, denominator = privacy["noise_multiplier"], privacy["clip_norm"], privacy["denominator"]
    assert denominator == 4.0 and figures["denominator"] == denominator and figures["declared_count"] == 4
    assert figures["expected_noise_norm_of_mean"] == pytest.approx(z * clip * math.sqrt(d) / denominator)
    assert figures["max_signal_norm"] == clip
    assert figures["ratio"] == pytest.approx(z * math.sqrt(d) / denominator)
    assert figures["crossing_count"] == pytest.approx(z * math.sqrt(d) / privacy["sample_rate"])
    assert figures["ratio_over_releases"] == pytest.approx(figures["ratio"] / math.sqrt(2))
    assert figures["threshold"] is None and figures["ratio"] > 100  # the adapter is noise: not checked, said so
    # the round metrics' figure is the same function's
    assert [r["expected_noise_norm_of_mean"] for r in result["rounds"]] == [round(figures["expected_noise_norm_of_mean"], 6)] * 2
    assert f"- {figures['summary']}" in lora_model_card(privacy, result["metrics"], [])
    assert any(figures["summary"] in r.getMessage() for r in caplog.records)


def test_the_readme_main_job_runs_and_its_card_states_the_figures(tmp_path):
    cfg = RunConfig.from_run_config({**demo_config().to_run_config(), "output-dir": str(tmp_path), "device": "cpu"})
    pipe = load_pipeline(str(REPO_ROOT / cfg.model_path), device="cpu")
    result = run_dpagg(ReplayGrid(4, dpagg_answer(64, cfg.clip_norm)), cfg, tmp_path, pipe)
    privacy = json.loads(json.dumps(result["privacy"]))
    figures = privacy["signal_to_noise"]
    assert figures["dimension"] == privacy["adapter"]["dim"] == 64 and figures["declared_count"] == cfg.dataset_size
    assert figures["threshold"] == 10.0 and figures["ratio"] < 1
    assert figures["expected_noise_norm_of_mean"] == pytest.approx(
        privacy["noise_multiplier"] * cfg.clip_norm * 8 / privacy["denominator"])
    assert f"- {figures['summary']}" in model_card(privacy, result["metrics"], [])
