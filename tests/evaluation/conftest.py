"""Fixtures shared by the evaluation tests: the pretrained emoji base, the committed images and
known-answer adapters (deliberately overfit, non-private LoRAs)."""

from __future__ import annotations

import pytest
import torch

from common.paths import REPO_ROOT

EMOJI_SD = REPO_ROOT / "assets" / "emoji-sd"
DEMO = REPO_ROOT / "data" / "demo"
HELDOUT = REPO_ROOT / "tests" / "data" / "twemoji-heldout"


@pytest.fixture(scope="session")
def emoji_pipe():
    """The committed pretrained 32x32 base, on the CPU in fp32 (read-only: do not attach adapters)."""
    from common.models import load_pipeline

    return load_pipeline(EMOJI_SD, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def demo_sites():
    from common.data import load_site_images

    return {i: load_site_images(DEMO / f"site-{i}", site=f"site-{i}", resolution=32) for i in range(4)}


@pytest.fixture(scope="session")
def heldout():
    from common.data import load_site_images

    return load_site_images(HELDOUT, site="heldout", resolution=32)


def overfit_lora(images, steps: int = 60):
    """A pipeline with a rank-8 LoRA trained hard on ``images`` (non-private): full-batch AdamW
    at lr 5e-3, seeded (~25 s for 8 images on 2 idle cores)."""
    from common.diffusion import denoising_loss, encode_latents
    from common.lora import LoRASpec, attach_lora, lora_parameters
    from common.models import load_pipeline

    pipe = load_pipeline(EMOJI_SD, device="cpu")
    spec = LoRASpec(rank=8, alpha=8.0)
    attach_lora(pipe, spec, seed=0)
    params = lora_parameters(pipe, spec)
    opt = torch.optim.AdamW(params, lr=5e-3)
    latents = encode_latents(pipe.vae, images.pixels).mean
    ids = pipe.tokenizer([c or "an image" for c in images.captions], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids)[0].detach()
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.requires_grad_(True)
    pipe.unet.train()
    for _ in range(steps):
        opt.zero_grad()
        denoising_loss(pipe.unet, pipe.scheduler, latents, hidden, gen).mean().backward()
        opt.step()
    pipe.unet.eval()
    for p in params:
        p.requires_grad_(False)
    return pipe


@pytest.fixture(scope="session")
def small_members(demo_sites):
    """The 8 images the small overfit adapter trains on: the first 8 of Noto site-0."""
    from evaluation.fixtures import take

    return take(demo_sites[0], 0, 8)


@pytest.fixture(scope="session")
def small_overfit_pipe(small_members):
    """The emoji base with a rank-8 LoRA overfit on ``small_members`` (trained once per session,
    shared by the utility and the default-run attack tests; read-only). 120 steps: on the rebuilt
    base (1,636 images, Min-SNR) 60 steps left PIA at AUC 0.71 [0.45, 0.92]."""
    return overfit_lora(small_members, steps=120)


@pytest.fixture(scope="session")
def overfit_split(demo_sites):
    """16 members (site-0 and 4 of site-1) and 16 non-members (site-2 and 4 of site-3)."""
    from evaluation.fixtures import take

    return [demo_sites[0], take(demo_sites[1], 0, 4)], [demo_sites[2], take(demo_sites[3], 0, 4)]


@pytest.fixture(scope="session")
def overfit_run(tmp_path_factory, overfit_split):
    """A deliberately overfit non-private LoRA (rank 16, 200 steps of 8) on the 16 members
    (~2 min on 2 busy cores)."""
    from evaluation.fixtures import merge, overfit_lora_run

    return overfit_lora_run(tmp_path_factory.mktemp("overfit"), EMOJI_SD, merge(overfit_split[0], "train"),
                            resolution=32)
