"""Test helpers shared by the client tests."""

from __future__ import annotations

import torch


def opacus_leftovers(pipe) -> list[str]:
    """Names of pipeline modules or parameters still carrying Opacus hooks or attributes."""
    found = []
    for part in ("text_encoder", "unet", "vae"):
        for name, module in getattr(pipe, part).named_modules():
            if module._forward_hooks or module._backward_hooks or hasattr(module, "autograd_grad_sample_hooks"):
                found.append(f"{part}.{name}")
        for name, p in getattr(pipe, part).named_parameters():
            if hasattr(p, "grad_sample") or hasattr(p, "_forward_counter"):
                found.append(f"{part}.{name}")
    return found


class FixedDraws:
    """Stands in for ``torch`` inside common.diffusion: randn/randint return preset values,
    so one example alone sees exactly the noise and timestep it saw in the batch."""

    def __init__(self, noise: torch.Tensor, timesteps: torch.Tensor) -> None:
        self.noise, self.timesteps = noise, timesteps

    def randn(self, shape, **_):
        assert tuple(shape) == tuple(self.noise.shape)
        return self.noise.clone()

    def randint(self, low, high, size, **_):
        assert tuple(size) == tuple(self.timesteps.shape)
        return self.timesteps.clone()

    def __getattr__(self, name):
        return getattr(torch, name)
