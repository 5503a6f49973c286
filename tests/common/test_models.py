"""Device/dtype selection and local-only pipeline loading."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from common.models import latent_scaling_factor, load_pipeline, select_device, select_dtype


def test_select_device() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ValueError, match="unknown device"):
        select_device("tpu")


def test_select_dtype() -> None:
    cpu = torch.device("cpu")
    assert select_dtype(cpu) == torch.float32
    assert select_dtype("cuda") == torch.float16
    assert select_dtype(cpu, "bfloat16") == torch.bfloat16
    assert select_dtype(cpu, "fp16") == torch.float16
    assert select_dtype(cpu, torch.float32) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        select_dtype(cpu, "int8")


def test_load_pipeline_missing_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_pipeline(missing, device="cpu")


def test_load_pipeline_without_model_index_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ".*model_index.json"):
        load_pipeline(tmp_path, device="cpu")


def test_load_pipeline_names_missing_components(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match="missing vae, text_encoder, tokenizer, scheduler"):
        load_pipeline(tmp_path, device="cpu")


def test_load_pipeline_is_frozen_on_cpu(tiny_sd_path: Path) -> None:
    pipe = load_pipeline(tiny_sd_path, device="cpu")
    assert pipe.safety_checker is None
    assert pipe.device == torch.device("cpu")
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert not module.training
        assert all(not p.requires_grad for p in module.parameters())
        assert all(p.dtype == torch.float32 for p in module.parameters())
    assert pipe._progress_bar_config.get("disable") is True
    assert latent_scaling_factor(pipe.vae) == pytest.approx(0.18215)
    # transformers 5: CLIPTextModel has no .text_model; reach the token table this way.
    assert pipe.text_encoder.get_input_embeddings().weight.shape == (49408, 32)
