"""Model shapes the benchmarks need, without downloading anything.

Stable Diffusion 1.5's configs are public and small; they are written out here, so the
benchmarks can build an SD 1.5-shaped model (random weights) or read its LoRA shapes with no
network. Sources (the ``config.json`` files of the diffusers-format checkpoint
``stable-diffusion-v1-5/stable-diffusion-v1-5``, formerly ``runwayml/stable-diffusion-v1-5``):
``unet/config.json``, ``vae/config.json`` and ``text_encoder/config.json`` (the text encoder is
OpenAI's CLIP ViT-L/14 text tower, ``openai/clip-vit-large-patch14``). Only the keys that
change the architecture are kept; the rest are the diffusers / transformers defaults.
The parameter counts these give (UNet 859,520,964; VAE 83,653,863; text encoder 123,060,480)
are SD 1.5's published ones, which :func:`sd15_parameter_counts` lets a benchmark print.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch

SD15_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD15_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SD15_TEXT_ENCODER: dict[str, Any] = {
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-5,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}

SD15_PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
SD15_EMBEDDING_DIM = SD15_TEXT_ENCODER["hidden_size"]
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def meta_unet(config: dict[str, Any]):
    """A UNet2DConditionModel of ``config`` on the meta device (shapes only, no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


@functools.lru_cache(maxsize=8)
def _linear_layers(config_json: str) -> tuple[tuple[str, int, int], ...]:
    """(name, in_features, out_features) of every linear layer of the UNet (built once per config)."""
    return tuple((name, m.in_features, m.out_features) for name, m in meta_unet(json.loads(config_json)).named_modules()
                 if isinstance(m, torch.nn.Linear))


def lora_shapes(unet_config: dict[str, Any], rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> dict[str, tuple[int, ...]]:
    """The shapes of a peft LoRA of ``rank`` on the UNet's attention projections ``targets``,
    keyed as privadapt sends them (``unet.<module>.lora_A.weight`` / ``lora_B.weight``)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    shapes: dict[str, tuple[int, ...]] = {}
    for name, d_in, d_out in _linear_layers(json.dumps(unet_config, sort_keys=True)):
        if any(name.endswith("." + t) for t in targets):
            shapes[f"unet.{name}.lora_A.weight"] = (rank, d_in)
            shapes[f"unet.{name}.lora_B.weight"] = (d_out, rank)
    if not shapes:
        raise ValueError(f"the UNet has no linear layer named like {targets}")
    return shapes


def tiny_unet_config() -> dict[str, Any]:
    """The UNet config of the embedded random tiny model (built on first use)."""
    from common.tiny_sd import tiny_sd_dir

    return json.loads((tiny_sd_dir() / "unet" / "config.json").read_text())


def sd15_parameter_counts() -> dict[str, int]:
    """Parameter counts of the three SD 1.5 parts built on the meta device from the configs."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        parts = {"unet": meta_unet(SD15_UNET), "vae": AutoencoderKL.from_config(SD15_VAE),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER))}
    return {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
