"""What a secure sum yields and its release: the sum of the surviving sites' contributions
(:class:`SecureSumResult`, formed by ``server.secagg.secure_sum``), and, with distributed noise,
the release and privacy event it makes (:func:`distributed_release`).

With distributed noise the sites added the noise before masking, so the server adds none: the
release only divides by the public denominator, and its event carries the ACHIEVED multiplier
``result.achieved_noise_multiplier(z)`` (z * sqrt(s / d) with s survivors of d shares), never the
planned z. With ``total is None`` (no site sampled) nothing was revealed: release nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from common.dp.mechanism import PrivacyEvent, Unit
from common.secagg.distributed_noise import achieved_noise_multiplier
from common.secagg.quantization import QuantizationSpec


@dataclass(frozen=True)
class SecureSumResult:
    """What a secure sum learned.

    Attributes:
        total: float64 sum of the survivors' contributions (plus their noise shares), by
            tensor name; None if no site was asked.
        survivors: sites whose masked input is in the sum.
        dropped: asked sites whose input is NOT in the sum (at whatever stage they left).
        entered: sites that entered the masking stage (m; each split its noise by it).
        noise_shares: d, the number of shares the total noise variance was split into (m or
            t); 0 when no noise was asked for.
        spec: the public quantization used.
    """

    total: dict[str, torch.Tensor] | None
    survivors: list[int]
    dropped: list[int]
    entered: list[int]
    noise_shares: int = 0
    spec: QuantizationSpec | None = None
    stages: dict[str, list[int]] = field(default_factory=dict)

    def achieved_noise_multiplier(self, noise_multiplier: float) -> float:
        """z * sqrt(s / d): the multiplier the sum really carries (0 without noise)."""
        if self.noise_shares == 0:
            return 0.0
        return achieved_noise_multiplier(noise_multiplier, self.noise_shares, len(self.survivors))


def distributed_release(result: SecureSumResult, *, noise_multiplier: float, denominator: float, sample_rate: float,
                        unit: Unit, label: str = "") -> tuple[dict[str, torch.Tensor], PrivacyEvent]:
    """The distributed-noise counterpart of ``GaussianSumMechanism.release``: the noise is
    already in ``result.total`` (the sites added it), so only divide by the public
    ``denominator``; the event carries the ACHIEVED multiplier z * sqrt(s / d), never the
    planned ``noise_multiplier`` (0, and so infinite epsilon, if the sites added no noise)."""
    if result.total is None:
        raise ValueError("no secure sum was formed: nothing to release")
    if not (denominator > 0 and math.isfinite(denominator)):
        raise ValueError(f"denominator must be finite and > 0, got {denominator}")
    released = {k: v / denominator for k, v in result.total.items()}
    event = PrivacyEvent.release(result.achieved_noise_multiplier(noise_multiplier), sample_rate, unit, label)
    return released, event
