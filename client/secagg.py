"""The site's side of secure aggregation with distributed noise (see common/secagg/).

``handle_secagg(msg, context, contribution_fn)`` answers one protocol stage. It calls
``contribution_fn()`` exactly once, at the ``setup`` stage: the first stage message is the one
that carries the strategy's payload (global adapter, round config), and the site commits to
its input there, before it shares any key. A site whose training fails therefore never
enters the key exchange and costs the others nothing. The site adds its noise share at the
``masked-input`` stage, once it knows how many sites entered.

Where the site keeps things between stages: ``context.state`` (a RecordDict), never a
module-level dict. In a deployment each message may start a fresh ``flwr-clientapp``
process, so module globals do not survive from one stage to the next; the SuperNode hands
the same ``context.state`` to every message of the run. The clipped contribution (an
ArrayRecord of float64) lives there from ``setup`` until it is masked at ``masked-input``
and is then deleted; the secret keys, the self-mask seed and the shares held for other
sites live there until ``unmask`` and are then deleted. None of it ever leaves the site
except as specified by the protocol.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from common import keys
from common.dp.mechanism import GaussianSumMechanism
from common.dp.noise import NoiseSource
from common.secagg import protocol as P
from common.secagg.distributed_noise import add_noise_share, noise_shares
from common.secagg.masking import (
    SEED_BYTES,
    decrypt_shares,
    encrypt_shares,
    generate_keypair,
    mask_input,
    share_secret,
)
from common.secagg.quantization import QuantizationSpec, flatten_tree

log = logging.getLogger("privadapt.client")

STATE_KEY = "privadapt-secagg"  # ConfigRecord in context.state: keys, seed, shares, stage
INPUT_KEY = "privadapt-secagg-input"  # ArrayRecord in context.state: the clipped contribution
_INPUT = "contribution"

ContributionFn = Callable[[], Mapping[str, torch.Tensor]]


class SecAggProtocolError(ValueError):
    """A stage message this site must not answer (out of order, wrong round, inconsistent)."""


def is_secagg(msg: Message) -> bool:
    """True if ``msg`` is a secure-aggregation stage message."""
    config = msg.content.get(keys.CONFIG)
    return isinstance(config, ConfigRecord) and P.STAGE in config


def handle_secagg(msg: Message, context: Context, contribution_fn: ContributionFn, *,
                  noise: NoiseSource | None = None) -> Message:
    """Answer one secure-aggregation stage; see :mod:`common.secagg.protocol`.

    Args:
        msg: the server's stage message (message_type "train", config with ``secagg-stage``).
        context: the site's Flower context; ``context.state`` keeps the protocol state.
        contribution_fn: returns the site's already clipped float64 tree; called once, at setup.
        noise: the source of this site's noise share (default: secure, ``os.urandom``).
    """
    config = msg.content[keys.CONFIG]
    stage = str(config[P.STAGE])
    if stage == P.SETUP:
        content = _setup(msg, context, config, contribution_fn)
    else:
        state = _state(context, stage, int(config[P.ROUND_ID]))
        if stage == P.SHARE_KEYS:
            content = _share_keys(context, state, config)
        elif stage == P.MASKED_INPUT:
            content = _masked_input(context, state, config, noise or NoiseSource.secure())
        elif stage == P.UNMASK:
            content = _unmask(context, state, config)
        else:
            raise SecAggProtocolError(f"unknown secure-aggregation stage {stage!r}")
    return Message(content=content, reply_to=msg)


def _state(context: Context, stage: str, round_id: int) -> ConfigRecord:
    state = context.state.get(STATE_KEY)
    if not isinstance(state, ConfigRecord):
        raise SecAggProtocolError(f"stage {stage!r} arrived, but this site took no part in a setup")
    if int(state["round"]) != round_id:
        raise SecAggProtocolError(f"stage {stage!r} is for round {round_id}, this site is in round {state['round']}")
    expected = P.STAGES[P.STAGES.index(str(state["stage"])) + 1] if state["stage"] != P.UNMASK else None
    if stage != expected:
        raise SecAggProtocolError(f"stage {stage!r} arrived after {state['stage']!r}; expected {expected!r}")
    return state


def _forget(context: Context) -> None:
    for name in (STATE_KEY, INPUT_KEY):
        if name in context.state:
            del context.state[name]


def _setup(msg: Message, context: Context, config: ConfigRecord, contribution_fn: ContributionFn) -> RecordDict:
    _forget(context)  # a new setup starts a new round from scratch
    spec = QuantizationSpec.from_config(config, P.SPEC_PREFIX)
    shapes = P.decode_shapes(config)
    threshold = int(config[P.THRESHOLD])
    tree = contribution_fn()  # the site commits to its input here
    l2_bound = float(config.get(P.L2_BOUND, 0.0))
    if l2_bound > 0:  # the server cannot re-clip a masked input: the site does it, exactly
        tree = GaussianSumMechanism(clip_norm=l2_bound, noise_multiplier=0.0).bound_tree(tree)
    vector = flatten_tree(tree, shapes)
    if not np.isfinite(vector).all():
        raise ValueError("the contribution has NaN or infinite entries")
    enc_sk, enc_pk = generate_keypair()
    mask_sk, mask_pk = generate_keypair()
    context.state[INPUT_KEY] = ArrayRecord(array_dict={_INPUT: Array(vector)})
    context.state[STATE_KEY] = ConfigRecord({
        "stage": P.SETUP, "round": int(config[P.ROUND_ID]), "node": int(msg.metadata.dst_node_id),
        "threshold": threshold, **spec.to_config(P.SPEC_PREFIX),
        "noise-std": float(config.get(P.NOISE_STD, 0.0)), "noise-split": str(config.get(P.NOISE_SPLIT, "entered")),
        "enc-sk": enc_sk, "enc-pk": enc_pk, "mask-sk": mask_sk, "mask-pk": mask_pk,
    })
    return RecordDict({keys.CONFIG: ConfigRecord({P.ENC_KEY: enc_pk, P.MASK_KEY: mask_pk})})


def _share_keys(context: Context, state: ConfigRecord, config: ConfigRecord) -> RecordDict:
    node, threshold = int(state["node"]), int(state["threshold"])
    nodes = [int(n) for n in config[P.NODES]]
    enc_keys, mask_keys = list(config[P.ENC_KEYS]), list(config[P.MASK_KEYS])
    if not (len(nodes) == len(enc_keys) == len(mask_keys)) or len(set(nodes)) != len(nodes):
        raise SecAggProtocolError("malformed key list")
    if len(set(enc_keys) | set(mask_keys)) != 2 * len(nodes):
        raise SecAggProtocolError("two sites were given the same public key")
    if node not in nodes or enc_keys[nodes.index(node)] != state["enc-pk"] or mask_keys[nodes.index(node)] != state["mask-pk"]:
        raise SecAggProtocolError("this site's own public keys are missing or altered in the key list")
    if len(nodes) < threshold:
        raise SecAggProtocolError(f"{len(nodes)} sites shared keys, fewer than the threshold {threshold}")
    seed = os.urandom(SEED_BYTES)
    seed_shares = share_secret(seed, threshold, len(nodes))
    key_shares = share_secret(bytes(state["mask-sk"]), threshold, len(nodes))
    dsts, ciphertexts = [], []
    for i, peer in enumerate(nodes):
        if peer != node:
            dsts.append(peer)
            ciphertexts.append(encrypt_shares(bytes(state["enc-sk"]), enc_keys[i], node, peer, seed_shares[i],
                                              key_shares[i]))
    me = nodes.index(node)
    state.update({"stage": P.SHARE_KEYS, "seed": seed, "nodes": nodes, "enc-keys": enc_keys, "mask-keys": mask_keys,
                  "share-owners": [node], "seed-shares": [seed_shares[me]], "key-shares": [key_shares[me]]})
    return RecordDict({keys.CONFIG: ConfigRecord({P.DESTINATIONS: dsts, P.CIPHERTEXTS: ciphertexts})})


def _masked_input(context: Context, state: ConfigRecord, config: ConfigRecord, noise: NoiseSource) -> RecordDict:
    node, threshold = int(state["node"]), int(state["threshold"])
    nodes = [int(n) for n in state["nodes"]]
    srcs, ciphertexts = [int(s) for s in config[P.SOURCES]], list(config[P.CIPHERTEXTS])
    if len(srcs) != len(ciphertexts) or len(set(srcs)) != len(srcs) or node in srcs or not set(srcs) <= set(nodes):
        raise SecAggProtocolError("malformed list of forwarded shares")
    entered = sorted([node, *srcs])
    if len(entered) < threshold:
        raise SecAggProtocolError(f"{len(entered)} sites entered masking, fewer than the threshold {threshold}")
    owners, seed_shares, key_shares = list(state["share-owners"]), list(state["seed-shares"]), list(state["key-shares"])
    for src, ciphertext in zip(srcs, ciphertexts):
        seed_share, key_share = decrypt_shares(bytes(state["enc-sk"]), state["enc-keys"][nodes.index(src)], src, node,
                                               ciphertext)
        owners.append(src)
        seed_shares.append(seed_share)
        key_shares.append(key_share)

    spec = QuantizationSpec.from_config(state, P.SPEC_PREFIX)
    vector = np.asarray(context.state[INPUT_KEY][_INPUT].numpy(), dtype=np.float64)
    total_std = float(state["noise-std"])
    if total_std > 0:
        shares = noise_shares(str(state["noise-split"]), len(entered), threshold)
        vector = add_noise_share(vector, total_std, shares, noise)  # float64, before quantization
    clamped = int(np.count_nonzero(np.abs(vector) > spec.clip_range))
    if clamped:
        log.warning("secagg round %s: %d coordinate(s) clamped to the clip range %g", state["round"], clamped,
                    spec.clip_range)
    mask_keys = {peer: state["mask-keys"][nodes.index(peer)] for peer in entered if peer != node}
    masked = mask_input(spec.encode(vector), spec=spec, round_id=int(state["round"]), own=node,
                        self_seed=bytes(state["seed"]), mask_private_key=bytes(state["mask-sk"]),
                        peer_mask_keys=mask_keys)
    del context.state[INPUT_KEY]  # the plain contribution is no longer needed anywhere
    state.update({"stage": P.MASKED_INPUT, "entered": entered, "share-owners": owners, "seed-shares": seed_shares,
                  "key-shares": key_shares})
    return RecordDict({keys.ARRAYS: ArrayRecord(array_dict={P.MASKED: Array(masked.astype(spec.wire_dtype))})})


def _unmask(context: Context, state: ConfigRecord, config: ConfigRecord) -> RecordDict:
    node, threshold = int(state["node"]), int(state["threshold"])
    survivors, dropped = [int(n) for n in config[P.SURVIVORS]], [int(n) for n in config[P.DROPPED]]
    entered = {int(n) for n in state["entered"]}
    # An honest site reveals, for each peer, EITHER the seed share (survivor) OR the key share
    # (dropout), never both: a peer cannot be named in both lists, nor can the lists differ
    # from the set of sites this site masked with.
    if set(survivors) & set(dropped) or set(survivors) | set(dropped) != entered or \
            len(set(survivors)) != len(survivors) or len(set(dropped)) != len(dropped):
        raise SecAggProtocolError("survivors and dropouts must split the sites that entered masking")
    if node not in survivors:
        raise SecAggProtocolError("this site sent its masked input but is named as a dropout")
    if len(survivors) < threshold:
        raise SecAggProtocolError(f"{len(survivors)} survivors, fewer than the threshold {threshold}")
    owners = [int(o) for o in state["share-owners"]]
    seed_shares, key_shares = list(state["seed-shares"]), list(state["key-shares"])
    reply = ConfigRecord({
        P.SURVIVORS: survivors, P.SEED_SHARES: [seed_shares[owners.index(u)] for u in survivors],
        P.DROPPED: dropped, P.KEY_SHARES: [key_shares[owners.index(u)] for u in dropped],
    })
    _forget(context)  # one unmasking per round: the secrets are gone after this answer
    return RecordDict({keys.CONFIG: reply})
