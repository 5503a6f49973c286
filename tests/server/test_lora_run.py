"""Tests of server/lora_run.py with FFA-LoRA: the real server code against two sites that answer
with the real ClientApp handler (:class:`tests.privacy.test_reply_contents.ClientAppGrid`)."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from flwr.app import Context, RecordDict

from common import keys
from common.config import RunConfig
from common.lora import attach_lora, frozen_state, lora_state, save_lora, tree_digest, tree_shapes
from common.models import load_pipeline
from common.reasons import REPLY_SITE_ERROR
from common.settings import lora_init_seed, lora_spec
from common.wire import packed_key, record_tree
from server.export import lora_model_card
from server.lora_run import run_lora
from tests.common.test_lora import same, unet_output
from tests.privacy.test_reply_contents import ClientAppGrid

FFA_RUN = {"adapter": "lora", "lora-variant": "ffa", "rounds": 2, "local-steps": 1, "lora-batch-size": 2,
           "dpsgd-batch-size": 12, "site-dataset-size": 12, "lora-rank": 2, "lora-alpha": 2.0, "num-sites": 2,
           "seed": 7}


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
