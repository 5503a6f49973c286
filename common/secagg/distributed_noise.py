"""Distributed Gaussian noise: every site adds a share, only the sum carries the full noise.

Plan: the sum must carry N(0, sigma^2 I) with sigma = z * C. Each of the m sites that entered
the masking stage (m is public: every site learns it from the key-sharing round) adds
N(0, sigma^2 / d) in float64 to its own clipped contribution, before quantization, where the
number of shares d is

- ``"entered"`` (default): d = m. Without dropouts the sum carries exactly sigma^2; if only
  s < m sites survive, it carries s * sigma^2 / m, and the ACHIEVED noise multiplier
  z * sqrt(s / m) < z is what must enter the ledger, never the planned z.
- ``"threshold"`` (compensation): d = t, the secure-aggregation threshold. Any s >= t
  survivors then carry s * sigma^2 / t >= sigma^2 (more noise than planned when nobody drops).

Against the honest-but-curious server (which sees only the sum) the release is the Gaussian
mechanism with multiplier z_achieved = z * sqrt(s / d) (:func:`achieved_noise_multiplier`).

Caveats, stated because they bound what the ledger may claim:

1. Rounding. Continuous Gaussian noise followed by per-site rounding to the grid 1/scale is
   not exactly the Gaussian mechanism on the sum: the sum of rounded values is not a
   post-processing of the noised sum. The distributed discrete Gaussian (Kairouz, Liu,
   Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
   Aggregation", ICML 2021) closes that gap with an exact analysis; this module does not
   implement it. The gap is small when the rounding error is far below the noise:
   :func:`rounding_to_noise_ratio` gives the ratio of the rounding error's std
   (sqrt(s / 12) / scale for s independent roundings) to the achieved noise std. At the
   power-of-two scale :meth:`QuantizationSpec.fit` picks for 10 sites and clip range 10 it is
   1.3e-15 for sigma = 0.01 with M = 2^64 (scale 2^56), 5e-6 with M = 2^32 (scale 2^24).
   Per-coordinate clamping to the clip range is a further non-linearity;
   :func:`suggest_clip_range` leaves ``tail`` standard deviations of room for the noise
   share so that clamping almost never happens (probability ~1e-15 per coordinate at 8).
2. Colluding sites know their own noise shares: against the server colluding with k
   surviving sites, the sum carries only (s - k) * sigma^2 / d.
3. Participation. The server picks and messages the sites, so it knows who took part:
   amplification by subsampling of SITES does not hold against it, and against it the
   site-level guarantee is for zero-out adjacency (a site's contribution replaced by zero;
   it still adds its noise share), for which z_achieved with sample rate 1 is exact (up to caveat 1). Towards
   parties that see only the released adapter, the Poisson add/remove analysis (rate q)
   needs a total noise that does not depend on who took part: true for the "entered" split
   when nobody drops out (sigma^2 for any m); with dropouts, or with the "threshold" split,
   the variance s * sigma^2 / d changes with participation and that analysis is only
   approximate. Record-level units (DPAgg-TI: images sampled secretly inside a site) keep
   their amplification against the server too: a site's noise share does not depend on
   its records.
4. Floating-point noise leaks in its low bits (Mironov, CCS 2012); see common.dp.noise.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from common.dp.noise import NoiseSource
from common.secagg.quantization import QuantizationSpec

NoiseSplit = Literal["entered", "threshold"]
NOISE_SPLITS = ("entered", "threshold")


def noise_shares(split: NoiseSplit, entered: int, threshold: int) -> int:
    """d, the number of shares the total noise variance is split into."""
    if split not in NOISE_SPLITS:
        raise ValueError(f"noise split must be one of {NOISE_SPLITS}, got {split!r}")
    if entered < 1 or threshold < 1:
        raise ValueError(f"entered and threshold must be >= 1, got {entered} and {threshold}")
    return entered if split == "entered" else threshold


def share_std(total_std: float, shares: int) -> float:
    """Std of one site's noise share: sigma / sqrt(d)."""
    if total_std < 0 or not math.isfinite(total_std):
        raise ValueError(f"noise std must be finite and >= 0, got {total_std}")
    if shares < 1:
        raise ValueError(f"shares must be >= 1, got {shares}")
    return total_std / math.sqrt(shares)


def add_noise_share(vector: np.ndarray, total_std: float, shares: int, noise: NoiseSource) -> np.ndarray:
    """``vector`` (float64) plus this site's N(0, total_std^2 / shares) share, in float64."""
    x = np.asarray(vector, dtype=np.float64)
    return x + noise.normal(x.shape, share_std(total_std, shares)).numpy()


def achieved_noise_multiplier(noise_multiplier: float, shares: int, survivors: int) -> float:
    """z * sqrt(s / d): the multiplier the sum of ``survivors`` noise shares really carries."""
    if survivors < 0 or shares < 1:
        raise ValueError(f"need survivors >= 0 and shares >= 1, got {survivors} and {shares}")
    return noise_multiplier * math.sqrt(survivors / shares)


def rounding_to_noise_ratio(spec: QuantizationSpec, total_std: float, shares: int, survivors: int) -> float:
    """Std of the summed rounding error over the achieved noise std (0 noise: inf)."""
    noise = total_std * math.sqrt(survivors / shares)
    rounding = math.sqrt(survivors / 12.0) / spec.scale
    return rounding / noise if noise > 0 else math.inf


def suggest_clip_range(l2_bound: float, total_std: float, min_shares: int, tail: float = 8.0) -> float:
    """A per-coordinate clip range that never clamps a contribution of L2 norm <= ``l2_bound``
    and clamps a noise share only beyond ``tail`` of its standard deviations."""
    return l2_bound + tail * share_std(total_std, min_shares)
