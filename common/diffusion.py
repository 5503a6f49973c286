"""The latent-diffusion training step, written out once for every adapter.

Follows the denoising objective of Rombach et al. 2022 (LDM, Eq. 2) as diffusers' training
scripts implement it: encode the image to latents, draw noise and a timestep, noise the
latents, predict with the UNet conditioned on the text, and regress the target given by the
scheduler's ``prediction_type``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LatentDist:
    """Cached diagonal-Gaussian posterior of the VAE for a batch of images."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, generator: torch.Generator | None, index: torch.Tensor | None = None) -> torch.Tensor:
        mean = self.mean if index is None else self.mean[index]
        std = self.std if index is None else self.std[index]
        return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, *, batch_size: int = 16) -> LatentDist:
    """Encode images in [-1, 1] once; latents are scaled by the VAE's scaling factor."""
    scale = vae.config.scaling_factor
    means, stds = [], []
    for chunk in pixels.split(batch_size):
        dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean * scale)
        stds.append(dist.std * scale)
    return LatentDist(torch.cat(means), torch.cat(stds))


def denoising_error(
    unet,
    scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Per-element squared denoising error, shape of ``latents`` (float32), at one random
    timestep and noise draw per sample."""
    batch = latents.shape[0]
    # noise and timestep, one per sample
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (batch,), generator=generator, device=latents.device
    )
    # forward diffusion q(x_t | x_0)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    # the UNet's prediction
    dtype = next(unet.parameters()).dtype  # also through wrappers (Opacus GradSampleModule)
    pred = unet(noisy, timesteps, encoder_hidden_states.to(dtype)).sample
    # the regression target depends on how the scheduler parameterises the model
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported scheduler prediction_type {kind!r}")
    return F.mse_loss(pred.float(), target.float(), reduction="none")


def denoising_loss(unet, scheduler, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   generator: torch.Generator | None) -> torch.Tensor:
    """Per-sample mean squared denoising error, shape [B] (float32)."""
    error = denoising_error(unet, scheduler, latents, encoder_hidden_states, generator)
    return error.mean(dim=tuple(range(1, error.ndim)))
