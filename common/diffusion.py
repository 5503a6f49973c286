"""The latent-diffusion training step, written out once for every adapter.

Follows the denoising objective of Rombach et al. 2022 (LDM, Eq. 2) as diffusers' training
scripts implement it: encode the image to latents, draw noise and a timestep, noise the
latents, predict with the UNet conditioned on the text, and regress the target given by the
scheduler's ``prediction_type``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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

    def rows(self, index: torch.Tensor | slice) -> "LatentDist":
        return LatentDist(self.mean[index], self.std[index])


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, *, batch_size: int = 16,
                   sizes: Sequence[int] | None = None) -> LatentDist:
    """Encode images in [-1, 1] once; latents are scaled by the VAE's scaling factor.

    The images go through the VAE ``batch_size`` at a time, or in chunks of ``sizes``
    (summing to the number of images) when given: a caller that must keep the number of
    VAE passes fixed (the padded DPAgg-TI run, :mod:`client.ti`) chooses them itself."""
    scale = vae.config.scaling_factor
    means, stds = [], []
    for chunk in pixels.split(list(sizes) if sizes is not None else batch_size):
        dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean * scale)
        stds.append(dist.std * scale)
    return LatentDist(torch.cat(means), torch.cat(stds))


@dataclass(frozen=True)
class StepDraws:
    """One training step's random draws for a set of rows: a latent sample from each row's
    VAE posterior, the diffusion noise and the timestep. Drawn for all rows at once, they do
    not depend on how the rows are later split into batches (:mod:`client.ti`)."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor

    def rows(self, index: torch.Tensor) -> "StepDraws":
        return StepDraws(self.latents[index], self.noise[index], self.timesteps[index])


def draw_noise(scheduler, latents: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The diffusion noise and one timestep per sample, in that order from ``generator``."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device
    )
    return noise, timesteps


def draw_step(dist: LatentDist, scheduler, generator: torch.Generator | None) -> StepDraws:
    """Every row's draws for one step, in the order a single batch of all rows draws them
    (latent sample, noise, timesteps): a run that fits in one batch is unchanged by it."""
    latents = dist.sample(generator)
    return StepDraws(latents, *draw_noise(scheduler, latents, generator))


def prediction_error(unet, scheduler, draws: StepDraws, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """Per-element squared denoising error of given draws, shape of ``draws.latents`` (float32)."""
    latents, noise, timesteps = draws.latents, draws.noise, draws.timesteps
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


def denoising_error(
    unet,
    scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Per-element squared denoising error, shape of ``latents`` (float32), at one random
    timestep and noise draw per sample."""
    draws = StepDraws(latents, *draw_noise(scheduler, latents, generator))
    return prediction_error(unet, scheduler, draws, encoder_hidden_states)


def per_sample_mean(error: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: [B, ...] -> [B]."""
    return error.mean(dim=tuple(range(1, error.ndim)))


def denoising_loss(unet, scheduler, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   generator: torch.Generator | None) -> torch.Tensor:
    """Per-sample mean squared denoising error, shape [B] (float32)."""
    return per_sample_mean(denoising_error(unet, scheduler, latents, encoder_hidden_states, generator))
