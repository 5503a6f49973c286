import math

import pytest
import torch

from client.lora_train import LORA_DEFENSES, LoRATrainSettings, train_lora_locally
from client.smp import attacker_from_bytes
from common.config import ADVERSARIAL_DEFENSES
from common.data import SiteImages
from common.lora import LoRASpec, attach_lora, frozen_state, load_lora_state, lora_state
from common.models import load_pipeline

SPEC = LoRASpec(rank=2, alpha=2.0)


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    pipe = load_pipeline(tiny_sd_path, device="cpu")
    attach_lora(pipe, SPEC, seed=0)
    # a non-zero starting adapter, as in a later round (B = 0 would hide some gradients)
    start = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
             for k, v in lora_state(pipe, SPEC).items()}
    load_lora_state(pipe, SPEC, start)
    pipe.start = start
    return pipe


def site(n: int = 8, seed: int = 0, name: str = "site-a") -> SiteImages:
    pixels = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    captions = tuple("a red square" if i % 2 else None for i in range(n))
    return SiteImages(tuple(f"{i}.png" for i in range(n)), pixels, captions, name)


def run(pipe, defense: str, images=None, *, seed: int = 0, attacker_state=None, **overrides):
    """Train from the fixed starting adapter; returns the result and the new adapter."""
    load_lora_state(pipe, SPEC, pipe.start)
    settings = LoRATrainSettings(steps=2, batch_size=2, learning_rate=1e-2, defense=defense,
                                 **({"smp_lambda": 1.0} | overrides))
    result = train_lora_locally(pipe, SPEC, images or site(), settings, generator=torch.Generator().manual_seed(seed),
                                split_seed=11, attacker_state=attacker_state)
    return result, lora_state(pipe, SPEC)


def frozen_weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.clone() for name in ("unet", "text_encoder", "vae")
            for k, v in getattr(pipe, name).state_dict().items() if "lora_" not in k}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("defense", LORA_DEFENSES)
def test_a_round_trains_the_adapter_only_and_is_reproducible(pipe, defense):
    weights = frozen_weights(pipe)
    flags = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    result, after = run(pipe, defense)
    assert not same(after, pipe.start)
    assert same(frozen_weights(pipe), weights)
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == flags
    assert not any(m.training for m in (pipe.unet, pipe.text_encoder, pipe.vae))
    assert all(p.grad is None for p in pipe.unet.parameters())

    expected = {"adaptation-loss", "steps"} | ({"attacker-accuracy", "attacker-loss", "ce"} if defense != "none" else set())
    assert set(result.metrics) == expected
    assert all(math.isfinite(v) for v in result.metrics.values()) and result.metrics["steps"] == 2
    assert (result.attacker_state is None) == (defense == "none")

    again, after_again = run(pipe, defense)
    assert same(after, after_again) and again.metrics == result.metrics
    other, after_other = run(pipe, defense, seed=1)
    assert not same(after, after_other)


@pytest.mark.parametrize("defense", ADVERSARIAL_DEFENSES)
def test_attacker_state_carries_over_to_the_next_round(pipe, defense):
    first, _ = run(pipe, defense)
    h, opt = attacker_from_bytes(first.attacker_state, 4 * 8 * 8)
    assert float(opt.state_dict()["state"][0]["step"]) == 2
    second, _ = run(pipe, defense, seed=1, attacker_state=first.attacker_state)
    _, opt2 = attacker_from_bytes(second.attacker_state, 4 * 8 * 8)
    assert float(opt2.state_dict()["state"][0]["step"]) == 4
    fresh, _ = run(pipe, defense, seed=1)
    assert fresh.metrics["attacker-loss"] != second.metrics["attacker-loss"]


def test_smp_and_mp_differ_from_plain_lora(pipe):
    plain = run(pipe, "none")[1]
    mp, smp = run(pipe, "mp-lora")[1], run(pipe, "smp-lora")[1]
    assert not same(mp, smp) and not same(plain, smp)


def test_adversarial_training_reads_members_only_for_the_adapter(pipe):
    # with λ = 0 MP-LoRA is plain LoRA on the members: non-member pixels cannot move the adapter
    from client.smp import split_members

    splits = split_members(8, seed=11)
    base = run(pipe, "mp-lora", smp_lambda=0.0)[1]

    def changed(index: int):
        images = site()
        pixels = images.pixels.clone()
        pixels[index] = -pixels[index]
        return run(pipe, "mp-lora", SiteImages(images.names, pixels, images.captions, images.site), smp_lambda=0.0)[1]

    assert same(changed(int(splits.nonmember_te[0])), base)
    assert same(changed(int(splits.nonmember_aux[0])), base)
    assert not same(changed(int(splits.member_aux[0])), base)


@pytest.mark.parametrize("defense", ADVERSARIAL_DEFENSES)
def test_too_few_images_name_the_site(pipe, defense):
    with pytest.raises(ValueError, match=r"site 'tiny-site' .*3 image\(s\) are too few"):
        run(pipe, defense, site(3, name="tiny-site"))


def test_plain_lora_runs_on_a_single_image(pipe):
    result, after = run(pipe, "none", site(1))
    assert not same(after, pipe.start) and math.isfinite(result.metrics["adaptation-loss"])


@pytest.mark.parametrize("bad", [{"defense": "dp-sgd"}, {"steps": 0}, {"smp_lambda": -1.0}, {"aux_fraction": 1.0}])
def test_settings_are_checked(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        LoRATrainSettings(**bad)


# ---- FFA-LoRA: every defense trains B only; A stays at its public initialisation ------------------

FFA = LoRASpec(rank=2, alpha=2.0, variant="ffa")


@pytest.fixture(scope="module")
def ffa_pipe(tiny_sd_path):
    pipe = load_pipeline(tiny_sd_path, device="cpu")
    attach_lora(pipe, FFA, seed=0)
    pipe.a = frozen_state(pipe, FFA)
    pipe.start = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
                  for k, v in lora_state(pipe, FFA).items()}
    return pipe


@pytest.mark.parametrize("defense", LORA_DEFENSES)
def test_ffa_trains_b_only_and_leaves_a_bit_for_bit(ffa_pipe, defense):
    flags = {n: p.requires_grad for n, p in ffa_pipe.unet.named_parameters()}
    load_lora_state(ffa_pipe, FFA, ffa_pipe.start)
    settings = LoRATrainSettings(steps=2, batch_size=2, learning_rate=1e-2, defense=defense, smp_lambda=1.0)
    result = train_lora_locally(ffa_pipe, FFA, site(), settings, generator=torch.Generator().manual_seed(0),
                                split_seed=11, attacker_state=None)
    after = lora_state(ffa_pipe, FFA)
    assert set(after) == set(ffa_pipe.start) and all(".lora_B." in k for k in after)
    assert all(not torch.equal(after[k], ffa_pipe.start[k]) for k in after)  # every B moved
    assert same(frozen_state(ffa_pipe, FFA), ffa_pipe.a)  # A did not
    assert {n: p.requires_grad for n, p in ffa_pipe.unet.named_parameters()} == flags
    assert all(p.grad is None for p in ffa_pipe.unet.parameters())
    assert math.isfinite(result.metrics["adaptation-loss"])
