"""Tests of server/lora_run.py (and server.app.run_dpagg) on the server's real paths.

- The signal-to-noise check: it runs before any message reaches a site, a refused run is
  charged nothing, and privacy.json, the model card and the round metrics carry the same figures.
- FFA-LoRA: the real server code against two sites that answer with the real ClientApp handler
  (:class:`tests.privacy.test_reply_contents.ClientAppGrid`): B only on the wire and in the
  release, the public A in the export.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from diffusers import StableDiffusionPipeline
from flwr.app import Context, RecordDict

from common import keys
from common.config import RunConfig
from common.lora import attach_lora, frozen_state, lora_state, save_lora, tree_digest, tree_shapes
from common.models import load_pipeline
from common.paths import REPO_ROOT
from common.reasons import REPLY_SITE_ERROR
from common.settings import lora_init_seed, lora_spec
from common.wire import packed_key, record_tree
from server.app import run_dpagg
from server.export import lora_model_card, model_card
from server.lora_run import run_lora
from tests.common.dp.test_plan import EMOJI_SD_LORA, demo_config
from tests.common.test_lora import same, unet_output
from tests.privacy.test_reply_contents import ClientAppGrid
from tests.server.grids import ReplayGrid, dpagg_answer, lora_answer


EMOJI_SD = REPO_ROOT / "assets" / "emoji-sd"
FFA_RUN = {"adapter": "lora", "lora-variant": "ffa", "rounds": 2, "local-steps": 1, "lora-batch-size": 2,
           "dpsgd-batch-size": 12, "site-dataset-size": 12, "lora-rank": 2, "lora-alpha": 2.0, "num-sites": 2,
           "seed": 7,
           "max-noise-to-signal": "inf"}  # mechanics, not utility: 2 sites at site-level DP carry no signal


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



def ffa_config(tiny_sd_path, out, **overrides) -> RunConfig:
    return RunConfig.from_run_config({**FFA_RUN, "model-path": str(tiny_sd_path), "output-dir": str(out), **overrides})


def public_a(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The frozen A anyone draws from the run config alone."""
    pipe = load_pipeline(cfg.model_path, device="cpu")
    attach_lora(pipe, lora_spec(cfg), seed=lora_init_seed(cfg))
    return frozen_state(pipe, lora_spec(cfg))


@pytest.mark.parametrize("defense", ["none", "dp-sgd"])
def test_ffa_run_sends_aggregates_and_releases_b_only_and_exports_the_public_a(tmp_path, tiny_sd_path, defense):
    from client.app import _PIPELINES

    cfg = ffa_config(tiny_sd_path, tmp_path, defense=defense)
    spec = lora_spec(cfg)
    grid = ClientAppGrid(cfg)
    pipe = load_pipeline(cfg.model_path, device="cpu")
    result = run_lora(grid, cfg, tmp_path, pipe)
    a = public_a(cfg)
    b_shapes = tree_shapes(lora_state(pipe, spec))
    assert all(".lora_B." in k for k in b_shapes) and len(b_shapes) == len(a)

    # the server's messages and the sites' replies hold B only; the config names the public A
    assert len(grid.replies) == len(grid.sent_to_sites) == 4
    for message in grid.sent_to_sites:
        assert set(record_tree(message.content[keys.ARRAYS], b_shapes)) == set(b_shapes)
        assert message.content[keys.CONFIG][keys.LORA_FROZEN_A] == tree_digest(a)
    for reply in grid.replies:
        assert list(reply.content[keys.ARRAYS].keys()) == [packed_key(b_shapes)]
    assert [r["sites_used"] for r in result["rounds"]] == [2, 2]

    # A is the same bit for bit on the server, on the sites and in a fresh draw from the config
    assert same(frozen_state(pipe, spec), a)
    sites = [p for (model, _, s), p in _PIPELINES.items() if s == spec and model == str(tiny_sd_path)]
    assert sites and all(same(frozen_state(p, spec), a) for p in sites)

    # privacy.json and the card say which variant and how many parameters were released
    adapter = result["privacy"]["adapter"]
    assert adapter["variant"] == "ffa" and adapter["parameters"] == sum(v.numel() for v in lora_state(pipe, spec).values())
    assert adapter["frozen_parameters"] == sum(v.numel() for v in a.values())
    assert "B (released)" in result["privacy"]["mechanism"]
    card = lora_model_card(result["privacy"], result["metrics"], [])
    assert card.startswith("# privadapt FFA-LoRA adapter") and f"released: {adapter['parameters']:,} parameters" in card

    # the export: the public A and the released B, loaded by a stock pipeline, changes the UNet
    save_lora(tmp_path, pipe, spec)
    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None, local_files_only=True)
    base = unet_output(fresh)
    fresh.load_lora_weights(str(tmp_path))
    name = next(iter(fresh.unet.peft_config))
    loaded = {f"unet.{n.replace(f'.{name}.', '.')}": p.detach() for n, p in fresh.unet.named_parameters()
              if ".lora_A." in n}
    assert same(loaded, a)
    adapted = unet_output(fresh)
    assert torch.equal(adapted, unet_output(pipe)) and not torch.allclose(adapted, base)


def test_a_site_whose_frozen_a_is_not_the_servers_refuses_the_round(tmp_path, tiny_sd_path):
    cfg = ffa_config(tiny_sd_path, tmp_path, rounds=1)
    grid = ClientAppGrid(cfg)
    other = RunConfig.from_run_config({**cfg.to_run_config(), "seed": 8})  # another seed: another A
    grid.contexts[102] = Context(run_id=1, node_id=102, node_config={"partition-id": 1}, state=RecordDict(),
                                 run_config=other.to_run_config())
    result = run_lora(grid, cfg, tmp_path, load_pipeline(cfg.model_path, device="cpu"))
    (round_1,) = result["rounds"]
    assert round_1["sites_used"] == 1 and [r["reason"] for r in round_1["rejected"]] == [REPLY_SITE_ERROR]
