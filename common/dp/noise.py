"""Gaussian noise from an explicit source: the OS CSPRNG by default, seeded only on request.

Noise never comes from global RNG state. ``NoiseSource.secure()`` draws every sample from the
operating system's cryptographically secure generator (``os.urandom``) through the Box-Muller
transform in float64, so no seed exists that an observer could recover; ``NoiseSource.seeded(seed)``
gives reproducible draws. :func:`privacy_noise` picks between them from the run config's
``privacy-randomness``.

Notes:
    What each mode is for (run-config key ``privacy-randomness``):

    - ``"os"`` (the default, and the only private choice): every noise sample comes from
      ``os.urandom``. A redone round after a resume draws fresh noise; nothing about the
      noise can be regenerated from the outputs, the run config or the checkpoint.
    - ``"seeded-insecure"``: the noise is a deterministic function of the run seed (via
      :func:`common.paths.derive_seed` and a label), for tests and replayable research. The run
      seed is in ``run_config.json``, so anyone who knows it regenerates the noise, subtracts
      it from the release and recovers the exact clipped sum: such a run is NOT differentially
      private, and its outputs say so. Distributed noise shares refuse this mode outright.

    The description of a source (:meth:`NoiseSource.describe`) never contains a seed.

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

from common.paths import derive_seed


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
        self._generator: torch.Generator | None = None
        if not secure:
            self._generator = torch.Generator(device="cpu")
            self._generator.manual_seed(int(seed) % (2**63))

    @classmethod
    def seeded(cls, seed: int) -> "NoiseSource":
        """Reproducible noise for tests and replayable research: NOT private (the seed regenerates it)."""
        return cls(seed=seed, secure=False)

    @classmethod
    def secure(cls) -> "NoiseSource":
        """Noise whose every sample comes from ``os.urandom`` (production)."""
        return cls(seed=None, secure=True)

    def describe(self) -> str:
        """Where the noise comes from, in words, for reports; never the seed (it would regenerate the noise)."""
        if self.secure_mode:
            return "the OS CSPRNG (os.urandom, Box-Muller in float64)"
        return ("a seeded torch.Generator (seeded-insecure: anyone who knows the seed can regenerate this noise; "
                "not private)")

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


def privacy_noise(secret: bool, seed: int, *labels: int | str) -> NoiseSource:
    """The noise source of one privacy mechanism: the OS CSPRNG when ``secret``
    (``privacy-randomness = "os"``), else seeded with ``derive_seed(seed, *labels)``
    (``"seeded-insecure"``: replayable by anyone who knows the run seed, so NOT private)."""
    return NoiseSource.secure() if secret else NoiseSource.seeded(derive_seed(seed, *labels))


def urandom_uniform(n: int) -> np.ndarray:
    """n uniforms on {0, 1, ..., 2^53 - 1} / 2^53 (53 random mantissa bits each) from os.urandom."""
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    return (raw >> np.uint64(11)).astype(np.float64) / 2.0**53


def _urandom_standard_normal(n: int) -> np.ndarray:
    """n standard normals from os.urandom via Box-Muller on 53-bit uniforms."""
    pairs = (n + 1) // 2
    u1 = 1.0 - urandom_uniform(pairs)  # in (0, 1]: never zero, so the log is finite
    u2 = urandom_uniform(pairs)
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
