"""Tests of client/secagg.py: what one site keeps, sends and refuses, stage by stage."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.secagg import INPUT_KEY, STATE_KEY, SecAggProtocolError, handle_secagg, is_secagg
from common import keys
from common.secagg import protocol as P
from common.secagg.quantization import QuantizationSpec

pytestmark = pytest.mark.usefixtures("task_identity")  # Messages outside a Flower run

SHAPES = {"a": (2, 3), "b": (4,)}
SPEC = QuantizationSpec.fit(clip_range=2.0, num_sites=3)


def message(stage: str, node: int = 7, round_id: int = 1, **entries) -> Message:
    config = ConfigRecord({P.STAGE: stage, P.ROUND_ID: round_id, **entries})
    return Message(content=RecordDict({keys.CONFIG: config}), dst_node_id=node, message_type="train")


def setup_message(node: int = 7, round_id: int = 1) -> Message:
    return message(P.SETUP, node, round_id, **{P.THRESHOLD: 2, **SPEC.to_config(P.SPEC_PREFIX),
                                               **P.encode_shapes(SHAPES)})


def new_context(node: int = 7) -> Context:
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


class Contribution:
    def __init__(self, tree=None):
        self.calls, self.tree = 0, tree or {"a": torch.ones(2, 3), "b": torch.zeros(4)}

    def __call__(self):
        self.calls += 1
        return self.tree


def test_setup_commits_the_contribution_in_state_and_sends_only_public_keys():
    context, fn = new_context(), Contribution()
    reply = handle_secagg(setup_message(), context, fn)
    assert fn.calls == 1
    sent = reply.content
    assert list(sent) == [keys.CONFIG] and set(sent[keys.CONFIG]) == {P.ENC_KEY, P.MASK_KEY}
    assert b"PUBLIC KEY" in sent[keys.CONFIG][P.ENC_KEY]
    stored = context.state[INPUT_KEY]
    assert isinstance(stored, ArrayRecord) and stored["contribution"].numpy().tolist() == [1.0] * 6 + [0.0] * 4
    assert context.state[STATE_KEY]["stage"] == P.SETUP and context.state[STATE_KEY]["node"] == 7


def test_is_secagg_tells_protocol_messages_apart():
    assert is_secagg(setup_message())
    assert not is_secagg(Message(content=RecordDict({keys.CONFIG: ConfigRecord({keys.ROUND: 1})}), dst_node_id=7,
                                 message_type="train"))


def test_a_contribution_of_the_wrong_shape_fails_at_setup():
    with pytest.raises(ValueError, match="shape"):
        handle_secagg(setup_message(), new_context(), Contribution({"a": torch.ones(3, 2), "b": torch.zeros(4)}))


def test_stages_out_of_order_or_of_another_round_are_refused():
    context = new_context()
    with pytest.raises(SecAggProtocolError, match="no part in a setup"):
        handle_secagg(message(P.SHARE_KEYS), context, Contribution())
    handle_secagg(setup_message(), context, Contribution())
    with pytest.raises(SecAggProtocolError, match="expected 'share-keys'"):
        handle_secagg(message(P.MASKED_INPUT, **{P.SOURCES: [], P.CIPHERTEXTS: []}), context, Contribution())
    with pytest.raises(SecAggProtocolError, match="round 2"):
        handle_secagg(message(P.SHARE_KEYS, round_id=2), context, Contribution())


def test_share_keys_refuses_altered_own_keys_and_too_few_sites():
    context = new_context()
    keys_sent = handle_secagg(setup_message(), context, Contribution()).content[keys.CONFIG]
    other = handle_secagg(setup_message(node=8), new_context(8), Contribution()).content[keys.CONFIG]
    altered = message(P.SHARE_KEYS, **{P.NODES: [7, 8], P.ENC_KEYS: [other[P.ENC_KEY], keys_sent[P.ENC_KEY]],
                                       P.MASK_KEYS: [keys_sent[P.MASK_KEY], other[P.MASK_KEY]]})
    with pytest.raises(SecAggProtocolError, match="own public keys"):
        handle_secagg(altered, context, Contribution())
    alone = message(P.SHARE_KEYS, **{P.NODES: [7], P.ENC_KEYS: [keys_sent[P.ENC_KEY]],
                                     P.MASK_KEYS: [keys_sent[P.MASK_KEY]]})
    with pytest.raises(SecAggProtocolError, match="fewer than the threshold 2"):
        handle_secagg(alone, context, Contribution())


def test_share_keys_encrypts_one_share_pair_per_peer():
    contexts = {n: new_context(n) for n in (7, 8, 9)}
    pks = {n: handle_secagg(setup_message(node=n), contexts[n], Contribution()).content[keys.CONFIG] for n in contexts}
    broadcast = {P.NODES: [7, 8, 9], P.ENC_KEYS: [pks[n][P.ENC_KEY] for n in (7, 8, 9)],
                 P.MASK_KEYS: [pks[n][P.MASK_KEY] for n in (7, 8, 9)]}
    reply = handle_secagg(message(P.SHARE_KEYS, **broadcast), contexts[7], Contribution()).content[keys.CONFIG]
    assert reply[P.DESTINATIONS] == [8, 9] and len(reply[P.CIPHERTEXTS]) == 2
    seed = contexts[7].state[STATE_KEY]["seed"]
    assert all(seed not in c for c in reply[P.CIPHERTEXTS])  # the seed never travels in clear
