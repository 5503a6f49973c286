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


def test_style_slot_selects_the_drawing_style():
    """Stage 4 (scripts/teach_emoji_styles.py): the word after "in the style of" changes the
    picture (the slot DPAgg-TI's token fills). On these two prompts stages 1-3 alone give 0.054,
    this model 0.131 (assets/emoji-sd/README.md, scripts/style_slot_probe.py)."""
    pipe = load_pipeline(MODEL, device="cpu")
    diffs = []
    for concept in ("cat face", "car"):
        a, b = (pipe(f"an emoji of a {concept} in the style of {word}", num_inference_steps=25,
                     generator=torch.Generator().manual_seed(0), output_type="np").images[0]
                for word in ("flat", "outline"))
        diffs.append(np.abs(a - b).mean())
    assert np.mean(diffs) > 0.09, diffs


@pytest.fixture(scope="module")
def teach():
    import importlib.util
    import sys

    scripts = MODEL.parents[1] / "scripts"
    sys.path.insert(0, str(scripts))  # the script imports its sibling pretrain_emoji_sd
    try:
        spec = importlib.util.spec_from_file_location("teach_emoji_styles", scripts / "teach_emoji_styles.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(scripts))
    return module


def test_openmoji_file_matches_code_points_with_or_without_fe0f(teach, tmp_path):
    from common.emoji import EmojiImage

    for name in ("1F431.svg", "2764.svg"):
        (tmp_path / name).write_text("<svg/>")
    image = lambda stem: EmojiImage(Path(f"{stem}.png"), "k", ("k",), "c", 0)  # noqa: E731
    assert teach.openmoji_file(tmp_path, image("1f431")) == tmp_path / "1F431.svg"
    assert teach.openmoji_file(tmp_path, image("2764-fe0f")) == tmp_path / "2764.svg"
    assert teach.openmoji_file(tmp_path, image("1f436")) is None


def test_caption_table_gives_each_style_its_captions(teach):
    from common.emoji import EmojiImage
    from common.models import load_pipeline as load

    tokenizer = load(MODEL, device="cpu").tokenizer
    cat = EmojiImage(Path("1f431.png"), "cat", ("cat face", "cat"), "Animals & Nature", 0)
    ids, choices = teach.caption_table(tokenizer, [cat], [cat])
    decoded = [tokenizer.decode(ids[i], skip_special_tokens=True) for i in range(len(ids))]
    assert decoded[-1] == ""  # the empty caption, for classifier-free guidance
    assert sorted(decoded[i] for i in choices[0].tolist()) == sorted([
        "an emoji of a cat face", "an emoji of a cat face in the style of flat",
        "an emoji of a cat", "an emoji of a cat in the style of flat"])
    assert sorted(decoded[i] for i in choices[1].tolist()) == sorted([
        "an emoji of a cat face in the style of outline", "an emoji of a cat in the style of outline"])
