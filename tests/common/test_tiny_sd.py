"""The embedded tiny Stable Diffusion: deterministic, offline, real CLIP tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common.tiny_sd import (
    CLIP_VOCAB_SIZE,
    MARKER_NAME,
    REFERENCE_IDS,
    build_tiny_sd,
    tiny_sd_dir,
)

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_weights_and_rng_untouched(tiny_sd_path: Path, tmp_path: Path) -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    again = build_tiny_sd(tmp_path / "again", seed=0)
    assert torch.equal(torch.get_rng_state(), state), "the build must not consume the caller's RNG"
    for weights in (UNET_WEIGHTS, "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert _same_tensors(load_file(tiny_sd_path / weights), load_file(again / weights)), weights


def test_other_seed_other_weights(tiny_sd_path: Path, tmp_path: Path) -> None:
    other = build_tiny_sd(tmp_path / "other", seed=1)
    assert not _same_tensors(load_file(tiny_sd_path / UNET_WEIGHTS), load_file(other / UNET_WEIGHTS))


def test_rebuild_is_a_no_op(tiny_sd_path: Path) -> None:
    before = (tiny_sd_path / UNET_WEIGHTS).stat().st_mtime_ns
    assert build_tiny_sd(tiny_sd_path) == tiny_sd_path
    assert (tiny_sd_path / UNET_WEIGHTS).stat().st_mtime_ns == before


def test_pipeline_loads_offline_and_generates_deterministically(tiny_sd_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None and pipe.feature_extractor is None

    def generate() -> np.ndarray:
        generator = torch.Generator("cpu").manual_seed(0)
        out = pipe("a photo of a cat", num_inference_steps=2, generator=generator, output_type="np")
        return out.images

    first, second = generate(), generate()
    assert first.shape == (1, 64, 64, 3)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)


def test_tokenizer_is_real_clip(tiny_sd_path: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path / "tokenizer")
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    assert tokenizer.model_max_length == 77
    assert tokenizer("a photo of a cat").input_ids == REFERENCE_IDS
    padded = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[:4] == [49406, 320, 2368, 49407] and set(padded[4:]) == {49407}


def test_tiny_sd_dir_reuses_a_build_under_the_cache_root(
    tiny_sd_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(tiny_sd_path, tmp_path / "tiny-sd")
    before = (tmp_path / "tiny-sd" / UNET_WEIGHTS).stat().st_mtime_ns
    assert tiny_sd_dir(tmp_path) == tmp_path / "tiny-sd"
    monkeypatch.setenv("PRIVADAPT_CACHE", str(tmp_path))
    assert tiny_sd_dir() == tmp_path / "tiny-sd"
    assert (tmp_path / "tiny-sd" / UNET_WEIGHTS).stat().st_mtime_ns == before


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        build_tiny_sd(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / MARKER_NAME).exists()


def test_rejects_resolution_not_multiple_of_8(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        build_tiny_sd(tmp_path / "bad", resolution=60)
