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
    frozen_state,
    init_frozen_a,
    load_lora_state,
    lora_parameters,
    lora_state,
    save_lora,
    training_adapter,
    tree_add,
    tree_digest,
    tree_shapes,
    tree_sub,
)
from common.models import load_pipeline
from common.paths import derive_seed


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
    with pytest.raises(ValueError, match="variant"):
        LoRASpec(variant="dora")


# ---- FFA-LoRA: A frozen at a public seeded initialisation, only B trained and released ----------

FFA = LoRASpec(rank=2, alpha=2.0, variant="ffa")


def ffa_pipe(tiny_sd_path, seed: int = 5, spec: LoRASpec = FFA):
    pipe = load_pipeline(tiny_sd_path, device="cpu")
    attach_lora(pipe, spec, seed=seed)
    return pipe


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ffa_trains_and_releases_b_only_and_a_is_frozen(tiny_sd_path):
    pipe = load_pipeline(tiny_sd_path, device="cpu")
    before = unet_output(pipe)
    attach_lora(pipe, FFA, seed=5)
    assert torch.equal(unet_output(pipe), before)  # B = 0: a fresh adapter changes nothing
    trainable = {n for n, p in pipe.unet.named_parameters() if p.requires_grad}
    adapter = {n for n, _ in pipe.unet.named_parameters() if "lora_" in n}
    assert trainable == {n for n in adapter if ".lora_B." in n} and len(trainable) == len(adapter) // 2
    assert len(lora_parameters(pipe, FFA)) == len(trainable)
    released, frozen = lora_state(pipe, FFA), frozen_state(pipe, FFA)
    assert released and all(".lora_B." in k for k in released) and all(".lora_A." in k for k in frozen)
    assert {k.replace(".lora_A.", ".") for k in frozen} == {k.replace(".lora_B.", ".") for k in released}
    plain = LoRASpec(rank=2, alpha=2.0)
    assert tree_shapes(lora_state(pipe, plain)) == {**tree_shapes(frozen), **tree_shapes(released)}
    assert not frozen_state(pipe, plain)
    # d, the released dimension, is that of the B matrices alone: on this model just over half of LoRA's
    d_ffa, d_lora = (sum(v.numel() for v in lora_state(pipe, s).values()) for s in (FFA, plain))
    assert d_ffa == sum(v.numel() for v in released.values()) and 0.5 * d_lora <= d_ffa < 0.55 * d_lora
    # loading a B tree leaves A as drawn
    load_lora_state(pipe, FFA, {k: torch.ones_like(v) for k, v in released.items()})
    assert same(frozen_state(pipe, FFA), frozen) and not torch.equal(unet_output(pipe), before)


def test_ffa_a_is_a_public_function_of_seed_name_and_shape_only(tiny_sd_path):
    first = frozen_state(ffa_pipe(tiny_sd_path), FFA)
    # another pipeline, after other draws from the global generator: the same A, bit for bit
    torch.manual_seed(123)
    torch.randn(1000)
    second = ffa_pipe(tiny_sd_path)
    assert same(frozen_state(second, FFA), first) and tree_digest(frozen_state(second, FFA)) == tree_digest(first)
    assert not same(frozen_state(ffa_pipe(tiny_sd_path, seed=6), FFA), first)
    # the definition: N(0, 1/r^2), one CPU generator per tensor seeded from (seed, "ffa-lora-A", key)
    key, value = next(iter(first.items()))
    draw = torch.Generator().manual_seed(derive_seed(5, "ffa-lora-A", key))
    assert torch.equal(value, torch.randn(value.shape, generator=draw) / FFA.rank)
    a = torch.cat([v.flatten() for v in first.values()])
    assert abs(float(a.std()) - 1 / FFA.rank) < 0.05 and abs(float(a.mean())) < 0.05
    # idempotent, and only for FFA
    init_frozen_a(second, FFA, seed=5)
    assert same(frozen_state(second, FFA), first)
    with pytest.raises(ValueError, match="FFA"):
        init_frozen_a(second, LoRASpec(rank=2), seed=5)


def test_training_adapter_sets_exactly_the_trained_flags_and_restores_them(tiny_sd_path):
    pipe = ffa_pipe(tiny_sd_path)
    plain = LoRASpec(rank=2, alpha=2.0)  # the same attached adapter, trained as plain LoRA
    for p in lora_parameters(pipe, plain):
        p.requires_grad_(True)
    with training_adapter(pipe, FFA) as params:
        assert {id(p) for p in params} == {id(p) for p in lora_parameters(pipe, FFA)}
        assert [n for n, p in pipe.unet.named_parameters() if p.requires_grad] == [
            n for n, _ in pipe.unet.named_parameters() if ".lora_B." in n]
    assert all(p.requires_grad for p in lora_parameters(pipe, plain))


@pytest.mark.parametrize("text_encoder", [False, True])
def test_ffa_export_holds_the_frozen_a_and_reloads_in_a_stock_pipeline(tiny_sd_path, tmp_path, text_encoder):
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    spec = LoRASpec(rank=2, alpha=8.0, text_encoder=text_encoder, variant="ffa")
    pipe = ffa_pipe(tiny_sd_path, spec=spec)
    frozen = frozen_state(pipe, spec)
    load_lora_state(pipe, spec, random_state(pipe, spec))
    save_lora(tmp_path, pipe, spec)
    saved = load_file(str(tmp_path / LORA_FILE))
    unet_a = {k: v for k, v in frozen.items() if k.startswith("unet.")}
    assert all(torch.equal(saved[k.replace(".lora_A.", ".lora.down.")], v) for k, v in unet_a.items())
    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None, local_files_only=True)
    base = unet_output(fresh)
    fresh.load_lora_weights(str(tmp_path))
    name = next(iter(fresh.unet.peft_config))  # the stock loader names its adapter itself
    loaded = {f"unet.{k}": v for k, v in get_peft_model_state_dict(fresh.unet, adapter_name=name).items()
              if ".lora_A." in k}
    assert same(loaded, unet_a)  # the stock pipeline holds the public A, bit for bit
    adapted = unet_output(fresh)
    assert torch.equal(adapted, unet_output(pipe)) and not torch.allclose(adapted, base)
