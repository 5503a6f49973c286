"""Tests of client/dpsgd_lora.py: LoRA trained with Opacus DP-SGD on one site."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import RecordDict
from opacus.optimizers import DPOptimizer

import common.diffusion
from client.dpsgd_lora import dpsgd_lora_round
from client.site_accountant import NoiseSourceDPOptimizer, load_history
from common import keys
from common.config import RunConfig
from common.data import SiteImages
from common.diffusion import denoising_loss
from common.lora import LoRASpec, attach_lora, frozen_state, lora_parameters, lora_state
from common.models import load_pipeline
from tests.client.helpers import (
    FixedDraws,
    clip_each_record,
    opacus_grad_samples,
    opacus_leftovers,
    perturbed_lora_pipe,
)

SPEC = LoRASpec(rank=2, alpha=2.0)


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    return perturbed_lora_pipe(tiny_sd_path, SPEC)


def site_images(n: int = 6, seed: int = 3) -> SiteImages:
    pixels = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return SiteImages(tuple(f"{i}.png" for i in range(n)), pixels, tuple([None] * n), "site-x")


def config(**overrides) -> RunConfig:
    base = {"adapter": "lora", "defense": "dp-sgd", "num-sites": 2, "site-dataset-size": 6, "rounds": 2,
            "local-steps": 2, "dpsgd-batch-size": 3, "lora-rank": 2, "lora-alpha": 2.0, "target-epsilon": 8.0}
    return RunConfig.from_run_config({**base, **overrides})


def test_opacus_per_sample_gradients_on_the_lora_unet_match_a_loop(pipe, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=gen)
    noise = torch.randn(3, 4, 8, 8, generator=gen)
    timesteps = torch.tensor([10, 500, 990])
    ids = pipe.tokenizer(["an image", "a cat", "a dog on a hill"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
    params = lora_parameters(pipe, SPEC)

    loop = []
    for i in range(3):
        monkeypatch.setattr(common.diffusion, "torch", FixedDraws(noise[i:i + 1], timesteps[i:i + 1]))
        for p in params:
            p.grad = None
        denoising_loss(pipe.unet, pipe.scheduler, latents[i:i + 1], hidden[i:i + 1], None).sum().backward()
        loop.append(torch.cat([p.grad.flatten() for p in params]))
    loop = torch.stack(loop)

    monkeypatch.setattr(common.diffusion, "torch", FixedDraws(noise, timesteps))
    rows = opacus_grad_samples(pipe, params, lambda unet: denoising_loss(unet, pipe.scheduler, latents, hidden,
                                                                         None).mean())
    per_sample = torch.stack([torch.cat([g[i].flatten() for g in rows]) for i in range(3)])
    assert per_sample.shape == loop.shape
    for i in range(3):
        assert loop[i].norm() > 0
        rel = ((per_sample[i] - loop[i]).norm() / loop[i].norm()).item()
        assert rel < 1e-4, f"example {i}: relative error {rel}"
    assert (loop[0] - loop[1]).norm() > 1e-3 * loop[0].norm()
    assert opacus_leftovers(pipe) == []


def test_dp_round_trains_only_lora_and_the_accountant_persists(pipe):
    state = RecordDict()
    cfg = config()
    frozen = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "lora_" not in n}
    before = lora_state(pipe, SPEC)
    m1 = dpsgd_lora_round(pipe, SPEC, site_images(), cfg, state=state, site_index=1, round_index=1)
    after = lora_state(pipe, SPEC)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p, frozen[n]) for n, p in pipe.unet.named_parameters() if "lora_" not in n)
    assert m1[keys.SITE_SAMPLE_RATE] == 0.5 and m1[keys.SITE_STEPS] == 2 and m1[keys.SITE_INDEX] == 1
    assert m1[keys.SITE_NOISE_MULTIPLIER] > 0 and math.isfinite(m1[keys.DIAG_LOSS])
    m2 = dpsgd_lora_round(pipe, SPEC, site_images(), cfg, state=state, site_index=1, round_index=2)
    assert m2[keys.SITE_EPSILON] > m1[keys.SITE_EPSILON]
    assert m2[keys.SITE_EPSILON] <= 8.0 + 1e-9  # calibrated for rounds x local-steps
    assert [h.round for h in load_history(state)] == [1, 2]
    with pytest.raises(ValueError, match="above its target"):  # a third round is past the plan
        dpsgd_lora_round(pipe, SPEC, site_images(), cfg, state=state, site_index=1, round_index=3)
    assert opacus_leftovers(pipe) == [] and not pipe.unet.training


def test_a_site_without_usable_images_takes_noise_only_steps_instead_of_refusing(pipe):
    """With no image every Poisson batch is empty: the round adds noise only and reports the
    same public spend as any site, so whether a site answers reveals nothing of its images."""
    before = lora_state(pipe, SPEC)
    empty = SiteImages(names=(), pixels=torch.zeros(0, 3, 64, 64), captions=(), site="s")
    metrics = dpsgd_lora_round(pipe, SPEC, empty, config(), state=RecordDict(), site_index=1, round_index=1)
    after = lora_state(pipe, SPEC)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the noise moved the adapter
    assert metrics[keys.SITE_SAMPLE_RATE] == 0.5 and metrics[keys.SITE_NOISE_MULTIPLIER] > 0
    assert opacus_leftovers(pipe) == []


def test_record_target_can_differ_from_the_site_target(pipe):
    state = RecordDict()
    m = dpsgd_lora_round(pipe, SPEC, site_images(), config(**{"record-target-epsilon": 2.0}), state=state,
                         site_index=0, round_index=1)
    strict = m[keys.SITE_NOISE_MULTIPLIER]
    m8 = dpsgd_lora_round(pipe, SPEC, site_images(), config(), state=RecordDict(), site_index=0, round_index=1)
    assert strict > m8[keys.SITE_NOISE_MULTIPLIER]


def test_text_encoder_lora_is_refused_with_dp_sgd(pipe):
    with pytest.raises(ValueError, match="lora-text-encoder"):
        dpsgd_lora_round(pipe, LoRASpec(rank=2, text_encoder=True), site_images(), config(), state=RecordDict(),
                         site_index=0, round_index=1)


# ---- FFA-LoRA: Opacus computes, clips and noises the per-image gradients of B only ---------------

FFA = LoRASpec(rank=2, alpha=2.0, variant="ffa")


@pytest.fixture(scope="module")
def ffa_pipe(tiny_sd_path):
    p = load_pipeline(tiny_sd_path, device="cpu")
    attach_lora(p, FFA, seed=0)
    return p


def test_ffa_dp_sgd_clips_each_per_sample_gradient_of_b_exactly(ffa_pipe, monkeypatch):
    """Every step, Opacus' own clipping is run on each image's gradient alone (then on the
    batch, as usual): the clipped gradient's norm is at most C, it is the gradient scaled
    by min(1, C/||g||), and it is a gradient of the B matrices only (A gets none)."""
    c = 1e-4  # small: every per-image gradient is clipped
    a_params = [p for n, p in ffa_pipe.unet.named_parameters() if ".lora_A." in n]
    b_params = {id(p) for p in lora_parameters(ffa_pipe, FFA)}
    seen: list[tuple[float, float]] = []  # (norm before, norm after clipping) per image
    original = DPOptimizer.clip_and_accumulate

    def checked(self):
        assert {id(p) for p in self.params} == b_params
        assert not any(getattr(p, "grad_sample", None) is not None for p in a_params)
        seen.extend(clip_each_record(self, original, c, rtol=1e-5))

    monkeypatch.setattr(NoiseSourceDPOptimizer, "clip_and_accumulate", checked)
    a, b = frozen_state(ffa_pipe, FFA), lora_state(ffa_pipe, FFA)
    cfg = config(**{"lora-variant": "ffa", "dpsgd-max-grad-norm": c, "local-steps": 3})
    dpsgd_lora_round(ffa_pipe, FFA, site_images(), cfg, state=RecordDict(), site_index=0, round_index=1)
    assert seen and all(before > c for before, _ in seen)
    assert all(after <= c for _, after in seen)
    after = lora_state(ffa_pipe, FFA)
    assert set(after) == set(b) and all(".lora_B." in k for k in after)
    assert any(not torch.equal(after[k], b[k]) for k in b)
    assert all(torch.equal(v, a[k]) for k, v in frozen_state(ffa_pipe, FFA).items())  # A never moved
    assert not any(p.requires_grad for p in a_params) and opacus_leftovers(ffa_pipe) == []
