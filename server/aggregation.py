"""How a round's contributions reach the server: in the clear, or securely summed.

Three modes (run-config key ``aggregation``, :data:`common.config.AGGREGATIONS`):

- ``central``: sites send their clipped contributions; the server checks each, sums, and
  adds N(0, (zC)^2) once. The server sees every contribution and must be trusted.
- ``secure``: SecAgg on the Message API (:mod:`server.secagg`); the server learns only the
  sum of the surviving sites' contributions and then adds the noise itself, so it must still
  be trusted to add it, but no longer sees any site's contribution.
- ``distributed``: SecAgg, and every site adds its share N(0, sigma^2/m) before masking, so
  the sum the server unmasks already carries N(0, sigma^2). With dropouts it carries less:
  the event records the ACHIEVED multiplier z*sqrt(s/m), never the planned one.

Used by the DPAgg-TI and the LoRA strategies alike; the strategy calls
:func:`secure_round` from ``configure_train`` (it sends its own messages, so the strategy
returns none to Flower) and :func:`release_secure` from ``aggregate_train``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import torch
from flwr.app import RecordDict
from flwr.serverapp import Grid

from common.dp import GaussianSumMechanism, NoiseSource, PrivacyEvent
from common.dp.mechanism import Unit
from common.secagg.distributed_noise import suggest_clip_range
from common.secagg.protocol import NOISE_STD
from common.secagg.release import SecureSumResult, distributed_release
from server.secagg import SecureAggregationError, default_threshold, secure_sum

log = logging.getLogger("privadapt.server")


@dataclass
class SecureRound:
    """The outcome of one round's secure sum: a result, or the reason there is none."""

    round: int
    result: SecureSumResult | None = None
    error: str = ""


def secure_round(
    grid: Grid,
    nodes: list[int],
    *,
    mode: str,
    round_id: int,
    shapes: Mapping[str, tuple[int, ...]],
    mechanism: GaussianSumMechanism,
    contribution_bound: float,
    clip_each: bool,
    config: Mapping,
    payload: RecordDict | None,
    timeout: float,
) -> SecureRound:
    """Run the secure sum over ``nodes``; never raises for too few sites (returns the error).

    ``contribution_bound`` bounds the L2 norm of one site's contribution (C for a LoRA delta,
    N*C for a DPAgg-TI site sum); ``clip_each`` makes every site re-bound its contribution to
    C itself (the server cannot re-clip masked inputs)."""
    if mode not in ("secure", "distributed"):
        raise ValueError(f"secure_round needs mode 'secure' or 'distributed', got {mode!r}")
    if len(nodes) < 2:
        return SecureRound(round_id, error=f"{len(nodes)} site(s) sampled; secure aggregation needs at least 2")
    threshold = default_threshold(len(nodes))
    total_std = mechanism.noise_std if mode == "distributed" else 0.0
    try:
        result = secure_sum(
            grid, nodes, shapes=shapes, clip_range=suggest_clip_range(contribution_bound, total_std, threshold),
            threshold=threshold, round_id=round_id, timeout=timeout, setup_timeout=timeout,
            stage_config={**dict(config), NOISE_STD: total_std}, payload=payload,
            l2_bound=mechanism.clip_norm if clip_each else None,
        )
    except SecureAggregationError as err:
        log.warning("round %d: secure aggregation failed, nothing released or spent: %s", round_id, err)
        return SecureRound(round_id, error=str(err))
    if result.dropped:
        log.warning("round %d: sites %s dropped out of secure aggregation", round_id, result.dropped)
    return SecureRound(round_id, result=result)


def release_secure(
    secure: SecureRound,
    *,
    mode: str,
    mechanism: GaussianSumMechanism,
    noise: NoiseSource,
    denominator: float,
    sample_rate: float,
    unit: Unit,
    label: str,
) -> tuple[dict[str, torch.Tensor], PrivacyEvent] | None:
    """The round's release and its privacy event, or None when nothing was summed (no secure
    sum formed: nothing was revealed; the strategy still charges the attempt, since whether a
    sum forms depends on who took part)."""
    if secure.result is None or secure.result.total is None:
        return None
    if mode == "distributed":
        return distributed_release(secure.result, noise_multiplier=mechanism.noise_multiplier,
                                   denominator=denominator, sample_rate=sample_rate, unit=unit, label=label)
    return mechanism.release(secure.result.total, denominator=denominator, noise=noise, sample_rate=sample_rate,
                             unit=unit, label=label)
