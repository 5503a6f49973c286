"""Fixed-point encoding of float64 vectors into Z_M, M = 2^k, for secure aggregation.

Every site maps its (noised) float64 vector to integers with the same PUBLIC parameters:
each coordinate is clamped to ``[-clip_range, clip_range]``, multiplied by ``scale`` and
rounded to the nearest integer, then stored modulo M (two's complement in ``uint64``; for
k < 64 the high bits are masked off). Sums are taken modulo M, which is what the masks
need: masks are uniform in Z_M and cancel only there.

Recoverability bound: every site's integer lies in [-B, B] with B = ceil(clip_range * scale).
If ``n * B < M / 2`` for the n sites whose inputs can enter the sum, the true integer sum
lies in [-M/2, M/2) and is the unique representative of the wrapped sum in that interval,
so :func:`decode_sum` recovers it exactly. :meth:`QuantizationSpec.fit` picks the largest
power-of-two scale that satisfies the bound for a given n.

Quantization error: round-to-nearest moves each coordinate of each site by at most
1 / (2 * scale) (for values inside the clip range), so the decoded sum of s sites is within
``s / (2 * scale)`` of the exact float sum, plus float64 rounding of the result
(:meth:`QuantizationSpec.sum_error_bound`). With a power-of-two scale the multiplication is
exact in float64. For n = 10 sites and clip range 10, M = 2^64 gives scale 2^56 and a summed
error below 7e-17 per coordinate; M = 2^32 gives scale 2^24 and below 3e-7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

MAX_MODULUS_BITS = 64


@dataclass(frozen=True)
class QuantizationSpec:
    """Public fixed-point parameters shared by all sites and the server.

    Args:
        clip_range: each coordinate is clamped to ``[-clip_range, clip_range]`` before encoding.
        scale: integer levels per unit; a value x encodes as ``round(x * scale)``.
        modulus_bits: k, the modulus is M = 2^k (8 <= k <= 64).
    """

    clip_range: float
    scale: float
    modulus_bits: int = MAX_MODULUS_BITS

    def __post_init__(self) -> None:
        if not (self.clip_range > 0 and math.isfinite(self.clip_range)):
            raise ValueError(f"clip_range must be finite and > 0, got {self.clip_range}")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"scale must be finite and > 0, got {self.scale}")
        if not (8 <= self.modulus_bits <= MAX_MODULUS_BITS):
            raise ValueError(f"modulus_bits must be in [8, {MAX_MODULUS_BITS}], got {self.modulus_bits}")
        if self.max_level >= 2 ** (self.modulus_bits - 1):
            raise ValueError("clip_range * scale does not fit the modulus even for one site")

    @classmethod
    def fit(cls, clip_range: float, num_sites: int, modulus_bits: int = MAX_MODULUS_BITS) -> "QuantizationSpec":
        """The spec with the largest power-of-two scale whose sum over ``num_sites`` sites
        stays recoverable (``num_sites * ceil(clip_range * scale) < 2^(k-1)``)."""
        if num_sites < 1:
            raise ValueError(f"num_sites must be >= 1, got {num_sites}")
        half = 2 ** (modulus_bits - 1)
        exponent = math.floor(math.log2((half - 1) / (num_sites * clip_range)))
        while num_sites * math.ceil(clip_range * 2.0**exponent) >= half:
            exponent -= 1
        return cls(clip_range=clip_range, scale=2.0**exponent, modulus_bits=modulus_bits)

    @property
    def modulus(self) -> int:
        return 2**self.modulus_bits

    @property
    def max_level(self) -> int:
        """B: the largest absolute integer one site's coordinate can encode to."""
        return math.ceil(self.clip_range * self.scale)

    def max_sites(self) -> int:
        """The largest n for which the wrapped sum of n sites is recoverable."""
        return (2 ** (self.modulus_bits - 1) - 1) // self.max_level

    def sum_error_bound(self, num_sites: int, magnitude: float = 0.0) -> float:
        """Bound on |decoded sum - exact sum| per coordinate for ``num_sites`` inputs inside
        the clip range; ``magnitude`` (an upper bound on |sum|) adds float64 rounding."""
        return num_sites / (2.0 * self.scale) + 2.0 * magnitude * 2.0**-52

    def to_config(self, prefix: str = "") -> dict[str, float | int]:
        """The spec as ConfigRecord entries (names prefixed with ``prefix``)."""
        return {f"{prefix}clip-range": float(self.clip_range), f"{prefix}scale": float(self.scale),
                f"{prefix}modulus-bits": int(self.modulus_bits)}

    @classmethod
    def from_config(cls, config: Mapping, prefix: str = "") -> "QuantizationSpec":
        return cls(clip_range=float(config[f"{prefix}clip-range"]), scale=float(config[f"{prefix}scale"]),
                   modulus_bits=int(config[f"{prefix}modulus-bits"]))

    @property
    def wire_dtype(self) -> type:
        """The narrowest unsigned type that holds Z_M: what a masked vector travels as."""
        return np.uint32 if self.modulus_bits <= 32 else np.uint64

    def reduce(self, values: np.ndarray) -> np.ndarray:
        """``values`` (uint64, wrapped mod 2^64) reduced mod M."""
        if self.modulus_bits == 64:
            return values
        return values & np.uint64(self.modulus - 1)

    def encode(self, vector: np.ndarray) -> np.ndarray:
        """Clamp, scale, round to nearest and wrap into Z_M (uint64)."""
        x = np.asarray(vector, dtype=np.float64)
        if not np.isfinite(x).all():
            raise ValueError("cannot quantize NaN or infinite values")
        levels = np.rint(np.clip(x, -self.clip_range, self.clip_range) * self.scale).astype(np.int64)
        return self.reduce(levels.view(np.uint64))

    def decode_sum(self, wrapped: np.ndarray) -> np.ndarray:
        """The float64 value of a wrapped sum: its representative in [-M/2, M/2) / scale."""
        r = self.reduce(np.asarray(wrapped, dtype=np.uint64))
        if self.modulus_bits == 64:
            signed = r.view(np.int64).copy()
        else:
            signed = r.astype(np.int64)
            signed[signed >= 2 ** (self.modulus_bits - 1)] -= self.modulus
        return signed.astype(np.float64) / self.scale


def flatten_tree(tree: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> np.ndarray:
    """One float64 vector of ``tree``'s tensors in the key order of ``shapes``; checks that
    the keys and shapes match exactly."""
    if set(tree) != set(shapes):
        missing, extra = sorted(set(shapes) - set(tree)), sorted(set(tree) - set(shapes))
        raise ValueError(f"contribution keys do not match: missing {missing[:3]}, unexpected {extra[:3]}")
    parts = []
    for key, shape in shapes.items():
        value = tree[key].detach().to(torch.float64).cpu()
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"contribution {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        parts.append(value.reshape(-1).numpy())
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)


def unflatten_tree(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_tree`: float64 tensors by key."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for key, shape in shapes.items():
        size = math.prod(shape)
        out[key] = torch.from_numpy(np.array(vector[offset:offset + size], dtype=np.float64)).reshape(shape)
        offset += size
    if offset != len(vector):
        raise ValueError(f"vector has {len(vector)} entries, the shapes need {offset}")
    return out
