"""Gaussian noise from an explicit source: seeded for tests, CSPRNG-backed in secure mode.

Noise never comes from global RNG state. ``NoiseSource.seeded(seed)`` gives reproducible draws
(tests, simulations you want to replay); ``NoiseSource.secure()`` draws every sample from the
operating system's cryptographically secure generator (``os.urandom``) through the Box-Muller
transform in float64, so no seed exists that an observer could recover.

Notes:
    Floating-point Gaussian samplers leak in their low-order bits (Mironov, "On Significance
    of the Least Significant Bits for Differential Privacy", CCS 2012). Secure mode draws in
    float64 and the released adapters are float32, which rounds away most of that structure;
    it is not a proof against the attack. A discrete Gaussian over a fixed-point grid would
    be the rigorous remedy.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch


class NoiseSource:
    """Draws i.i.d. N(0, std^2) noise from an explicit generator.

    Use the constructors :meth:`seeded` and :meth:`secure`; the object is the only
    place in privadapt where DP noise is sampled.
    """

    def __init__(self, *, seed: int | None, secure: bool) -> None:
        if secure and seed is not None:
            raise ValueError("secure noise takes no seed: it reads the OS CSPRNG")
        if not secure and seed is None:
            raise ValueError("seeded noise needs an integer seed")
        self.secure_mode = secure
        self.seed = seed
        self._generator: torch.Generator | None = None
        if not secure:
            self._generator = torch.Generator(device="cpu")
            self._generator.manual_seed(int(seed) % (2**63))

    @classmethod
    def seeded(cls, seed: int) -> "NoiseSource":
        """Reproducible noise for tests and replayable simulations (not for production)."""
        return cls(seed=seed, secure=False)

    @classmethod
    def secure(cls) -> "NoiseSource":
        """Noise whose every sample comes from ``os.urandom`` (production)."""
        return cls(seed=None, secure=True)

    def describe(self) -> str:
        return "os.urandom Box-Muller (secure)" if self.secure_mode else f"torch.Generator seed={self.seed} (not secure)"

    def get_state(self) -> torch.Tensor | None:
        """The seeded generator's state (for checkpoints); None in secure mode (nothing to replay)."""
        return None if self._generator is None else self._generator.get_state()

    def set_state(self, state: torch.Tensor | None) -> None:
        """Restore a state from :meth:`get_state`; secure mode takes none (its noise is always fresh)."""
        if (state is None) != (self._generator is None):
            raise ValueError("a seeded noise state can only be restored into a seeded source, and vice versa")
        if self._generator is not None:
            self._generator.set_state(state)

    def normal(self, shape: tuple[int, ...] | torch.Size, std: float) -> torch.Tensor:
        """Return a float64 CPU tensor of i.i.d. N(0, std^2) samples."""
        if std < 0 or not math.isfinite(std):
            raise ValueError(f"noise std must be finite and >= 0, got {std}")
        shape = tuple(int(s) for s in shape)
        if std == 0:
            return torch.zeros(shape, dtype=torch.float64)
        if not self.secure_mode:
            return torch.randn(shape, generator=self._generator, dtype=torch.float64) * std
        return torch.from_numpy(_urandom_standard_normal(math.prod(shape)).reshape(shape)) * std


def _urandom_standard_normal(n: int) -> np.ndarray:
    """n standard normals from os.urandom via Box-Muller on 53-bit uniforms in (0, 1]."""
    pairs = (n + 1) // 2
    raw = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    # 53 random mantissa bits -> uniform on {1, ..., 2^53} / 2^53, never zero (log is finite).
    u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53
    u2 = (raw[1] >> np.uint64(11)).astype(np.float64) / 2.0**53
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
