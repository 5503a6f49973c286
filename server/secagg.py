"""Secure summation over Flower's Grid (SecAgg, Bonawitz et al. CCS 2017, on the Message API).

:func:`secure_sum` runs the four stages of :mod:`common.secagg.protocol` with
``grid.send_and_receive`` and returns the sum of the surviving sites' (noised, clipped)
contributions. The server only ever handles public keys, ciphertexts it cannot read, masked
vectors (uniform in Z_M on their own) and the shares it needs to remove the masks from
their SUM. A site that stops answering at any stage is left out; the protocol goes on as
long as at least ``threshold`` sites remain, and otherwise raises
:class:`SecureAggregationError` saying how many remained.

Trust model: honest-but-curious server (it follows the protocol but tries to learn from
what it sees), honest sites; no consistency-check round and no signatures, so a MALICIOUS
server that lies to sites about who dropped could unmask one site (Bonawitz et al. Sec. 6
need a PKI and round 3 for that). A coalition of the server with fewer than ``threshold``
sites learns nothing beyond the sum and its members' own inputs.

What the strategy must do with the result (:class:`common.secagg.release.SecureSumResult`):
use ``total`` in place of the sum of replies. With distributed noise, add no central noise:
:func:`common.secagg.release.distributed_release` divides by the public denominator and
returns the privacy event with the ACHIEVED multiplier ``result.achieved_noise_multiplier(z)``,
never the planned z. With ``total is None`` (no site sampled) or a
:class:`SecureAggregationError`, nothing was revealed: release nothing.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common import keys
from common.secagg import protocol as P
from common.secagg.distributed_noise import NOISE_SPLITS, noise_shares
from common.secagg.masking import reconstruct_secret, unmask_sum
from common.secagg.quantization import QuantizationSpec, unflatten_tree
from common.secagg.release import SecureSumResult

log = logging.getLogger("privadapt.server")

MIN_SITES = 2  # the sum of one site's input is that input


class SecureAggregationError(RuntimeError):
    """Too few sites remained at some stage: no sum can be formed."""


def default_threshold(num_sites: int) -> int:
    """A strict majority, and at least 2."""
    return max(MIN_SITES, num_sites // 2 + 1)


def secure_sum(
    grid: Grid,
    nodes: list[int],
    *,
    shapes: Mapping[str, tuple[int, ...]],
    clip_range: float,
    threshold: int | None,
    round_id: int,
    timeout: float,
    stage_config: Mapping,
    payload: RecordDict | None = None,
    setup_timeout: float | None = None,
    modulus_bits: int = 64,
    l2_bound: float | None = None,
) -> SecureSumResult:
    """Securely sum the sampled sites' contributions; see the module docstring.

    Args:
        grid: Flower's Grid (only ``send_and_receive`` is used).
        nodes: the sampled sites.
        shapes: tensor names and shapes of one contribution (encoded in sorted name order).
        clip_range: public per-coordinate range of a (noised) contribution.
        threshold: t, the fewest sites that must remain at every stage (None: a majority).
        round_id: tags every message (group_id) and separates the masks of different rounds.
        timeout: per stage, seconds ``send_and_receive`` waits for replies.
        stage_config: entries for the setup message's ConfigRecord: the strategy's round
            config and, for distributed noise, ``distributed-noise-std`` (sigma = z*C of the
            total) and optionally ``distributed-noise-split``.
        payload: records sent with the setup message (e.g. the global adapter in
            ``keys.ARRAYS``); the site trains on it when the setup message arrives.
        setup_timeout: timeout of the setup stage, in which the sites train (default ``timeout``).
        modulus_bits: k of the modulus M = 2^k.
        l2_bound: if given, every site re-bounds its contribution to this flat L2 norm C
            before noising (the server cannot re-clip masked inputs as it does in central mode).
    """
    nodes = sorted(set(int(n) for n in nodes))
    if not nodes:
        return SecureSumResult(total=None, survivors=[], dropped=[], entered=[])
    t = default_threshold(len(nodes)) if threshold is None else int(threshold)
    if t < MIN_SITES:
        raise ValueError(f"threshold must be >= {MIN_SITES}: the sum of one site is that site's input")
    if any(str(k).startswith("secagg-") for k in stage_config):
        raise ValueError("stage_config must not set secagg-* entries")
    run = _Run(grid, round_id, timeout)
    _require(len(nodes), t, "sampled")
    shapes = {k: tuple(int(d) for d in shapes[k]) for k in sorted(shapes)}
    size = sum(int(np.prod(s)) for s in shapes.values())
    spec = QuantizationSpec.fit(clip_range, len(nodes), modulus_bits)
    noise_std = float(stage_config.get(P.NOISE_STD, 0.0))
    split = str(stage_config.get(P.NOISE_SPLIT, "entered"))
    if not (noise_std >= 0 and math.isfinite(noise_std)) or split not in NOISE_SPLITS:
        raise ValueError(f"{P.NOISE_STD} must be finite and >= 0 and {P.NOISE_SPLIT} one of {NOISE_SPLITS}, "
                         f"got {noise_std} and {split!r}")

    # 1. setup: the sites train, commit to their input and advertise two public keys
    setup = {**dict(stage_config), P.THRESHOLD: t, **spec.to_config(P.SPEC_PREFIX), **P.encode_shapes(shapes)}
    if l2_bound is not None:
        if not (0 < l2_bound <= clip_range):
            raise ValueError(f"l2_bound must be in (0, clip_range], got {l2_bound} with clip_range {clip_range}")
        setup[P.L2_BOUND] = float(l2_bound)
    replies = run.stage(P.SETUP, {n: setup for n in nodes}, payload, setup_timeout)
    advertised = {n: (r[P.ENC_KEY], r[P.MASK_KEY]) for n, r in _configs(replies).items()
                  if isinstance(r.get(P.ENC_KEY), bytes) and isinstance(r.get(P.MASK_KEY), bytes)}
    keyed = sorted(advertised)
    _require(len(keyed), t, "advertised keys")

    # 2. share-keys: broadcast the keys; each site returns its shares encrypted for each peer
    broadcast = {P.NODES: keyed, P.ENC_KEYS: [advertised[n][0] for n in keyed],
                 P.MASK_KEYS: [advertised[n][1] for n in keyed]}
    outbox = _share_outbox(run.stage(P.SHARE_KEYS, {n: broadcast for n in keyed}), keyed, round_id)
    entered = sorted(outbox)
    _require(len(entered), t, "shared keys")

    # 3. masked-input: forward each site the shares written for it; collect masked vectors
    forwarded = {v: {P.SOURCES: [u for u in entered if u != v], P.CIPHERTEXTS: [outbox[u][v] for u in entered if u != v]}
                 for v in entered}
    masked_sum, survivors = _sum_masked(run.stage(P.MASKED_INPUT, forwarded), size, spec, round_id)
    _require(len(survivors), t, "sent masked inputs")
    dropouts = [n for n in entered if n not in survivors]

    # 4. unmask: shares of the survivors' self-mask seeds and of the dropouts' masking keys
    request = {P.SURVIVORS: survivors, P.DROPPED: dropouts}
    answered, seed_shares, key_shares = _collect_shares(run.stage(P.UNMASK, {n: request for n in survivors}),
                                                        survivors, dropouts, round_id)
    _require(answered, t, "sent unmasking shares")
    try:
        seeds = {u: reconstruct_secret(s, t) for u, s in seed_shares.items()}
        dropped_keys = {u: reconstruct_secret(s, t) for u, s in key_shares.items()}
    except ValueError as err:
        raise SecureAggregationError(f"secagg round {round_id}: shares do not reconstruct: {err}") from err
    mask_keys = {u: advertised[u][1] for u in survivors}
    summed = unmask_sum(spec.reduce(masked_sum), spec=spec, round_id=round_id, self_seeds=seeds,
                        dropped_keys=dropped_keys, mask_public_keys=mask_keys)
    total = unflatten_tree(spec.decode_sum(summed), shapes)
    shares = noise_shares(split, len(entered), t) if noise_std > 0 else 0
    log.info("secagg round %d: %d sampled, %d entered masking, %d in the sum", round_id, len(nodes), len(entered),
             len(survivors))
    return SecureSumResult(total=total, survivors=survivors, dropped=[n for n in nodes if n not in survivors],
                           entered=entered, noise_shares=shares, spec=spec, stages=run.answered)


def _require(remaining: int, threshold: int, what: str) -> None:
    if remaining < threshold:
        raise SecureAggregationError(f"secure aggregation failed: {remaining} site(s) {what}, "
                                     f"fewer than the threshold {threshold}")


class _Run:
    """Sends one stage's messages and keeps the first valid reply of each asked site."""

    def __init__(self, grid: Grid, round_id: int, timeout: float) -> None:
        self.grid, self.round_id, self.timeout = grid, round_id, timeout
        self.answered: dict[str, list[int]] = {}

    def stage(self, stage: str, configs: dict[int, Mapping], payload: RecordDict | None = None,
              timeout: float | None = None) -> dict[int, Message]:
        messages = []
        for node, entries in configs.items():
            content = RecordDict(dict(payload.items()) if payload is not None else {})
            content[keys.CONFIG] = ConfigRecord({**_payload_config(payload), **dict(entries), P.STAGE: stage,
                                                 P.ROUND_ID: self.round_id})
            messages.append(Message(content=content, dst_node_id=node, message_type="train",
                                    group_id=str(self.round_id)))
        replies: dict[int, Message] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout if timeout is None else timeout):
            node = reply.metadata.src_node_id
            if node not in configs or node in replies:
                log.warning("secagg round %d, %s: ignoring a reply from node %s (not asked, or twice)",
                            self.round_id, stage, node)
            elif reply.has_error():
                # the site's error text is not echoed (it may name private files)
                log.warning("secagg round %d, %s: node %s returned an error (code %s)", self.round_id, stage, node,
                            reply.error.code)
            else:
                replies[node] = reply
        self.answered[stage] = sorted(replies)
        return replies


def _share_outbox(replies: Mapping[int, Message], keyed: list[int], round_id: int) -> dict[int, dict[int, bytes]]:
    """sender -> (recipient -> ciphertext), for the senders that wrote to every other keyed site."""
    outbox: dict[int, dict[int, bytes]] = {}
    for n, r in _configs(replies).items():
        dsts, ctxts = [int(d) for d in r.get(P.DESTINATIONS, [])], list(r.get(P.CIPHERTEXTS, []))
        if len(dsts) == len(ctxts) and sorted(dsts) == [m for m in keyed if m != n]:
            outbox[n] = dict(zip(dsts, ctxts))
        else:
            log.warning("secagg round %d: node %s sent a malformed share list; left out", round_id, n)
    return outbox


def _sum_masked(replies: Mapping[int, Message], size: int, spec: QuantizationSpec, round_id: int
                ) -> tuple[np.ndarray, list[int]]:
    """The wrapped sum of the valid masked vectors and the sites that sent them."""
    masked_sum = np.zeros(size, dtype=np.uint64)
    survivors = []
    for n, reply in sorted(replies.items()):
        vector = _masked_vector(reply, size, spec)
        if vector is None:
            log.warning("secagg round %d: node %s sent no valid masked vector; treated as a dropout", round_id, n)
            continue
        masked_sum = masked_sum + vector  # wraps mod 2^64, a multiple of M
        survivors.append(n)
    return masked_sum, survivors


def _collect_shares(replies: Mapping[int, Message], survivors: list[int], dropouts: list[int], round_id: int
                    ) -> tuple[int, dict[int, list[bytes]], dict[int, list[bytes]]]:
    """(number of valid answers, seed shares by survivor, key shares by dropout)."""
    seed_shares: dict[int, list[bytes]] = {u: [] for u in survivors}
    key_shares: dict[int, list[bytes]] = {u: [] for u in dropouts}
    answered = 0
    for n, r in _configs(replies).items():
        if [int(u) for u in r.get(P.SURVIVORS, [])] != survivors or [int(u) for u in r.get(P.DROPPED, [])] != dropouts \
                or len(r.get(P.SEED_SHARES, [])) != len(survivors) or len(r.get(P.KEY_SHARES, [])) != len(dropouts):
            log.warning("secagg round %d: node %s answered the unmask request malformed; ignored", round_id, n)
            continue
        for u, share in zip(survivors, r[P.SEED_SHARES]):
            seed_shares[u].append(share)
        for u, share in zip(dropouts, r[P.KEY_SHARES]):
            key_shares[u].append(share)
        answered += 1
    return answered, seed_shares, key_shares


def _payload_config(payload: RecordDict | None) -> dict:
    config = payload.get(keys.CONFIG) if payload is not None else None
    return dict(config) if isinstance(config, ConfigRecord) else {}


def _configs(replies: Mapping[int, Message]) -> dict[int, ConfigRecord]:
    out = {}
    for node, reply in replies.items():
        config = reply.content.get(keys.CONFIG)
        if isinstance(config, ConfigRecord):
            out[node] = config
    return out


def _masked_vector(reply: Message, size: int, spec: QuantizationSpec) -> np.ndarray | None:
    arrays = reply.content.get(keys.ARRAYS)
    if not isinstance(arrays, ArrayRecord) or P.MASKED not in arrays:
        return None
    vector = arrays[P.MASKED].numpy()
    if vector.dtype != spec.wire_dtype or vector.shape != (size,):
        return None
    return vector.astype(np.uint64)  # values >= M (k < 64) are reduced with the sum
