"""The committed base model (assets/emoji-sd) loads with stock diffusers and draws."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.models import check_pipeline_dir, load_pipeline

MODEL = Path(__file__).resolve().parents[2] / "assets" / "emoji-sd"


def test_folder_is_small_and_documented():
    check_pipeline_dir(MODEL)
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size <= 25 * 2**20
    for name in ("README.md", "LICENSE.md", "training.json", "loss_curve.png"):
        assert (MODEL / name).is_file(), name
    assert json.loads((MODEL / "training.json").read_text())["resolution"] == 32


def test_stock_pipeline_loads_and_generates_a_finite_image():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("an emoji of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_encoder_is_deterministic_and_latents_are_unit_scale():
    """The posterior's std is at the floor, and scaled latents of real images have std ~ 1."""
    from PIL import Image

    pipe = load_pipeline(MODEL, device="cpu")
    paths = sorted((MODEL.parents[1] / "data" / "demo").glob("site-*/*.png"))[:16]
    x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((32, 32), Image.BOX)))
                     for p in paths]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        dist = pipe.vae.encode(x).latent_dist
    assert float(dist.std.max()) < 1e-5
    scaled = dist.mean * pipe.vae.config.scaling_factor
    assert 0.5 < float(scaled.std()) < 2.0


@pytest.mark.parametrize("steps", [25])
def test_prompts_change_the_picture(steps):
    """Conditioning works: two prompts from the same seed give different images."""
    pipe = load_pipeline(MODEL, device="cpu")
    images = [pipe(p, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
              for p in ("an emoji of a cat", "an emoji of a car")]
    assert np.abs(images[0] - images[1]).mean() > 0.02
