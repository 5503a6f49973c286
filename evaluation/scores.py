"""Per-image denoising errors of a pipeline at chosen timesteps and fixed noise draws.

The loss attack (Matsumoto, Miura, Yanai, "Membership Inference Attacks against Diffusion
Models", IEEE SPW 2023), its reference-calibrated form (Carlini et al., "Extracting Training
Data from Diffusion Models", USENIX Security 2023: adapted loss minus base loss) and the
utility "denoising loss on held-out images" all read the same quantity: for image x_0 with
caption c, timestep t and noise eps,

    L(x_0, t, eps) = mean over latent elements of (target(x_0, eps, t) - unet(x_t, t, c))^2,
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,

target = eps (or v) as the scheduler's prediction_type says. The noise is drawn ONCE per
(image, draw) from ``seed`` and reused at every timestep and for every model scored with the
same seed, so the difference between two models is not blurred by different noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from common.diffusion import encode_latents


@dataclass(frozen=True)
class Encoded:
    """Images as the UNet sees them: VAE latents (posterior means, scaled) and text states."""

    latents: torch.Tensor  # [N, C, h, w]
    hidden: torch.Tensor  # [N, L, D]

    def __len__(self) -> int:
        return self.latents.shape[0]


@torch.no_grad()
def encode(pipe, pixels: torch.Tensor, prompts: Sequence[str], *, batch_size: int = 16) -> Encoded:
    """Encode images in [-1, 1] ([N, 3, R, R]) and one prompt per image.

    The latent is the posterior mean (deterministic): the attacks score the image itself,
    not a VAE sample of it."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be [N, 3, R, R], got {tuple(pixels.shape)}")
    if len(prompts) != pixels.shape[0]:
        raise ValueError(f"{pixels.shape[0]} images but {len(prompts)} prompts")
    latents = encode_latents(pipe.vae, pixels, batch_size=batch_size).mean
    tok = pipe.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(pipe.text_encoder.device)
    hidden = torch.cat([pipe.text_encoder(chunk)[0] for chunk in ids.split(batch_size)])
    return Encoded(latents, hidden)


def check_timesteps(scheduler, timesteps: Sequence[int]) -> list[int]:
    steps = [int(t) for t in timesteps]
    total = scheduler.config.num_train_timesteps
    if not steps or any(not 0 <= t < total for t in steps):
        raise ValueError(f"timesteps must be a non-empty list in [0, {total}), got {list(timesteps)}")
    return steps


def fixed_noise(shape: torch.Size, draws: int, seed: int, device, dtype) -> torch.Tensor:
    """[draws, *shape] standard normal noise from ``seed`` (the same for every model)."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((draws, *shape), generator=gen, dtype=torch.float32).to(device, dtype)


def _target(scheduler, latents, noise, t):
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"unsupported scheduler prediction_type {kind!r}")


@torch.no_grad()
def denoising_errors(unet, scheduler, data: Encoded, timesteps: Sequence[int], *, draws: int = 4, seed: int = 0,
                     batch_size: int = 32) -> torch.Tensor:
    """Per-image mean squared denoising error, float64 [N, len(timesteps), draws] on the CPU."""
    steps = check_timesteps(scheduler, timesteps)
    dtype = next(unet.parameters()).dtype
    device = data.latents.device
    noise = fixed_noise(data.latents.shape, draws, seed, device, data.latents.dtype)
    out = torch.empty((len(data), len(steps), draws), dtype=torch.float64)
    for j, t in enumerate(steps):
        for d in range(draws):
            for start in range(0, len(data), batch_size):
                sl = slice(start, start + batch_size)
                x0, eps = data.latents[sl], noise[d, sl]
                tt = torch.full((x0.shape[0],), t, device=device, dtype=torch.long)
                noisy = scheduler.add_noise(x0, eps, tt)
                pred = unet(noisy.to(dtype), tt, data.hidden[sl].to(dtype)).sample.float()
                err = F.mse_loss(pred, _target(scheduler, x0, eps, tt).float(), reduction="none")
                out[sl, j, d] = err.flatten(1).mean(1).double().cpu()
    return out


def mean_denoising_loss(unet, scheduler, data: Encoded, timesteps: Sequence[int], *, draws: int = 4,
                        seed: int = 0) -> float:
    """The denoising loss averaged over images, timesteps and draws (a utility figure)."""
    return float(denoising_errors(unet, scheduler, data, timesteps, draws=draws, seed=seed).mean())
