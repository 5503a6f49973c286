"""Secure aggregation (SecAgg, Bonawitz et al. CCS 2017) and distributed noise, transport-free.

- :mod:`common.secagg.quantization`: fixed-point encoding into Z_M and its error bound.
- :mod:`common.secagg.masking`: key agreement, self and pairwise masks, Shamir sharing, unmasking.
- :mod:`common.secagg.distributed_noise`: each site's noise share and the achieved multiplier.
- :mod:`common.secagg.release`: what a secure sum yields, and the distributed-noise release
  and privacy event made from it.
- :mod:`common.secagg.protocol`: stage names and message entries (server/secagg.py,
  client/secagg.py run the stages over Flower messages).
"""

from common.secagg.distributed_noise import (
    achieved_noise_multiplier,
    add_noise_share,
    noise_shares,
    rounding_to_noise_ratio,
    share_std,
    suggest_clip_range,
)
from common.secagg.masking import (
    agree,
    generate_keypair,
    mask_input,
    pairwise_mask,
    reconstruct_secret,
    self_mask,
    share_secret,
    unmask_sum,
)
from common.secagg.quantization import QuantizationSpec, flatten_tree, unflatten_tree
from common.secagg.release import SecureSumResult, distributed_release

__all__ = [
    "QuantizationSpec",
    "SecureSumResult",
    "achieved_noise_multiplier",
    "add_noise_share",
    "agree",
    "distributed_release",
    "flatten_tree",
    "generate_keypair",
    "mask_input",
    "noise_shares",
    "pairwise_mask",
    "reconstruct_secret",
    "rounding_to_noise_ratio",
    "self_mask",
    "share_secret",
    "share_std",
    "suggest_clip_range",
    "unflatten_tree",
    "unmask_sum",
]
