"""Tests of common/lora.py: attaching, reading, writing and exporting LoRA adapters."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline

from common.lora import (
    LORA_FILE,
    LoRASpec,
    attach_lora,
    check_tree,
    flat_norm,
    load_lora_state,
    lora_parameters,
    lora_state,
    save_lora,
    tree_add,
    tree_shapes,
    tree_sub,
)
from common.models import load_pipeline


def unet_output(pipe, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ids = pipe.tokenizer(["an emoji of a cat", "a dog"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([10, 700]), pipe.text_encoder(ids)[0]).sample


def random_state(pipe, spec, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in lora_state(pipe, spec).items()}


def test_fresh_adapter_leaves_the_model_unchanged_and_only_lora_trains(tiny_sd_path):
    pipe = load_pipeline(tiny_sd_path, device="cpu")
    before = unet_output(pipe)
    spec = LoRASpec(rank=2, alpha=2.0)
    attach_lora(pipe, spec, seed=0)
    assert torch.equal(unet_output(pipe), before)  # B = 0
    trainable = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(lora_parameters(pipe, spec)) == len(trainable)
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())
    state = lora_state(pipe, spec)
    assert all(k.startswith("unet.") for k in state)
    # every attention projection of the UNet got an A and a B of rank 2
    targets = {n.rsplit(".lora_", 1)[0] for n in state}
    assert all(t.split(".")[-1] in ("to_q", "to_k", "to_v") or t.endswith("to_out.0") for t in targets)
    assert {v.shape[0] for k, v in state.items() if ".lora_A." in k} == {2}


def test_initialisation_is_deterministic_in_the_seed(tiny_sd_path):
    spec = LoRASpec(rank=2)
    states = []
    for seed in (5, 5, 6):
        pipe = load_pipeline(tiny_sd_path, device="cpu")
        attach_lora(pipe, spec, seed=seed)
        states.append(lora_state(pipe, spec))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])


@pytest.mark.parametrize("text_encoder", [False, True])
def test_export_reloads_in_a_stock_pipeline_with_identical_unet_outputs(tiny_sd_path, tmp_path, text_encoder):
    spec = LoRASpec(rank=2, alpha=8.0, text_encoder=text_encoder)  # alpha != rank: the scale must survive
    pipe = load_pipeline(tiny_sd_path, device="cpu")
    attach_lora(pipe, spec, seed=0)
    state = random_state(pipe, spec)
    load_lora_state(pipe, spec, state)
    assert all(torch.equal(lora_state(pipe, spec)[k], state[k]) for k in state)
    if text_encoder:
        assert any(k.startswith("text_encoder.") for k in state)
    path = save_lora(tmp_path, pipe, spec)
    assert path.name == LORA_FILE and path.exists()
    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None, local_files_only=True)
    base = unet_output(fresh)
    fresh.load_lora_weights(str(tmp_path))
    adapted = unet_output(fresh)
    assert torch.equal(adapted, unet_output(pipe))
    assert not torch.allclose(adapted, base)


def test_load_refuses_mismatched_trees(tiny_sd_path):
    pipe = load_pipeline(tiny_sd_path, device="cpu")
    spec = LoRASpec(rank=2)
    attach_lora(pipe, spec, seed=0)
    state = lora_state(pipe, spec)
    key = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        load_lora_state(pipe, spec, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="shape"):
        load_lora_state(pipe, spec, {**state, key: torch.zeros(3)})
    with pytest.raises(ValueError, match="NaN"):
        load_lora_state(pipe, spec, {**state, key: torch.full_like(state[key], float("nan"))})
    with pytest.raises(ValueError, match="dtype"):
        check_tree({**state, key: state[key].long()}, tree_shapes(state), "x")


def test_tree_arithmetic_and_flat_norm():
    a = {"x": torch.tensor([3.0, 0.0]), "y": torch.tensor([[4.0]])}
    b = {"x": torch.tensor([1.0, 1.0]), "y": torch.tensor([[1.0]])}
    assert flat_norm(a) == 5.0
    d = tree_sub(a, b)
    assert d["x"].dtype == torch.float64 and torch.equal(d["x"], torch.tensor([2.0, -1.0], dtype=torch.float64))
    back = tree_add(b, d)
    assert all(torch.equal(back[k], a[k]) for k in a)


def test_spec_validation():
    with pytest.raises(ValueError, match="rank"):
        LoRASpec(rank=0)
    with pytest.raises(ValueError, match="alpha"):
        LoRASpec(alpha=0)
    with pytest.raises(ValueError, match="target"):
        LoRASpec(targets=())
