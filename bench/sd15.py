"""Benchmark: a site's time and memory for one TI step and one LoRA step at SD 1.5's size.

The pipeline is built in memory from SD 1.5's published configs
(:mod:`bench.shapes`; UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M
parameters) with random weights: the arithmetic of a step does not depend on the weights'
values, so its time and memory are those of the real model. The tokenizer is the real CLIP
BPE tokenizer of the embedded tiny model, the noise schedule SD's (scaled-linear betas
0.00085..0.012 over 1,000 steps). fp32, 512x512 pixels (64x64 latents), batch 1, on the CPU
unless ``--device`` says otherwise. Each step runs privadapt's own client code:
:func:`client.ti.train_per_image_embeddings` and :func:`client.lora_train.train_lora_locally`
with ``steps=1`` (each includes the VAE encoding of the image, timed separately too).
Memory is the process' peak RSS during each phase (sampled every millisecond).

    .venv/bin/python -m bench.sd15
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.scale import PeakRSS
from bench.shapes import SD15_PARAMETERS, SD15_TEXT_ENCODER, SD15_UNET, SD15_VAE


def build_sd15(device: str):
    """A frozen SD 1.5-shaped StableDiffusionPipeline with random weights (seeded)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from common.tiny_sd import tiny_sd_dir

    torch.manual_seed(0)
    tiny = tiny_sd_dir()
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(SD15_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER)),
        tokenizer=CLIPTokenizer.from_pretrained(tiny / "tokenizer"),
        unet=UNet2DConditionModel.from_config(SD15_UNET),
        scheduler=DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                num_train_timesteps=1000, clip_sample=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    counts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in counts.items()}
    if counts != SD15_PARAMETERS:
        raise RuntimeError(f"the SD 1.5 configs give {counts} parameters, expected {SD15_PARAMETERS}")
    return pipe


def phase(fn) -> dict:
    with PeakRSS() as mem:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return {"s": round(seconds, 2), "peak_rss_gb": round(mem.peak / 1e9, 2),
            "peak_rss_increase_gb": round((mem.peak - mem.start) / 1e9, 2)}


def run(device: str = "cpu", resolution: int = 512, lora_rank: int = 4) -> dict:
    from client.lora_train import LoRATrainSettings, train_lora_locally
    from client.ti import train_per_image_embeddings
    from common.data import SiteImages
    from common.diffusion import encode_latents
    from common.lora import LoRASpec, attach_lora
    from common.textual_inversion import TISettings

    out: dict = {"device": device, "resolution": resolution, "latents": resolution // 8, "dtype": "float32",
                 "batch": 1, "threads": torch.get_num_threads(), "parameters": SD15_PARAMETERS}
    holder: dict = {}
    out["build"] = phase(lambda: holder.setdefault("pipe", build_sd15(device)))
    pipe = holder["pipe"]
    pixels = torch.rand(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    gen = torch.Generator(device=device)
    out["vae_encode"] = phase(lambda: encode_latents(pipe.vae, pixels))
    out["ti_step"] = phase(lambda: train_per_image_embeddings(pipe, pixels, [None], TISettings(steps=1, batch_size=1),
                                                              generator=gen.manual_seed(0)))
    spec = LoRASpec(rank=lora_rank, alpha=float(lora_rank))
    attach_lora(pipe, spec, seed=0)
    images = SiteImages(names=("a.png", "b.png"), pixels=pixels.repeat(2, 1, 1, 1), captions=(None, None), site="bench")
    out["lora_rank"] = lora_rank
    out["lora_step"] = phase(lambda: train_lora_locally(pipe, spec, images, LoRATrainSettings(steps=1, batch_size=1),
                                                        generator=gen.manual_seed(0), split_seed=0,
                                                        attacker_state=None))
    out["note"] = ("ti_step and lora_step are end to end for steps=1: each includes encoding its images with the VAE "
                   "(lora_step: 2 images, the site's pool) besides one forward and backward step")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--lora-rank", type=int, default=4)
    args = parser.parse_args(argv)
    result = run(args.device, args.resolution, args.lora_rank)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
