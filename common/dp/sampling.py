"""Poisson sampling: the sampling scheme every privadapt accountant assumes.

Each record (an image, or a site) is kept independently with probability q. This matches the
add/remove-one adjacency of Opacus' RDP and PRV accountants (Mironov, Talwar, Zhang 2019;
Zhu, Dong, Wang 2022, "Optimal accounting of differential privacy via characteristic
function", Sec. 5). The draws must stay secret for the amplification to hold.
"""

from __future__ import annotations

import secrets

import torch


def sampling_generator(seed: int | None) -> torch.Generator:
    """CPU generator for Poisson sampling: seeded for replay, OS-random in secure mode.

    The sampling must stay secret for amplification by subsampling to hold, so production
    runs (``seed=None``) seed it from the OS CSPRNG.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(secrets.randbits(63) if seed is None else seed)
    return gen


def poisson_sample(n: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of the records kept by independent Bernoulli(rate) draws (Poisson sampling)."""
    if rate >= 1.0:
        return torch.arange(n)
    return torch.nonzero(torch.rand(n, generator=generator) < rate).flatten()
