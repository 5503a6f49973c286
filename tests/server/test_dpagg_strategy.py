import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.common import Metadata

from common import keys
from common.dp import GaussianSumMechanism, NoiseSource, PrivacyLedger
from common.dp.plan import DPAggPlan
from common.reasons import REPLY_MALFORMED, REPLY_REJECTED, REPLY_UNASKED
from server.dpagg_strategy import DPAggTIStrategy
from server.replies import ReplyError, read_vector

DIM = 4


def reply_with(value, node_id=1):
    """A site's reply as the ServerApp receives it (metadata set as the SuperLink would)."""
    meta = Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0, reply_to_message_id="q",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    content = RecordDict({keys.ARRAYS: ArrayRecord(array_dict={keys.EMBEDDING_SUM: Array(np.asarray(value, dtype=np.float64))})})
    return Message(content=content, metadata=meta)


def strategy(z=0.0, tmp_path=None):
    plan = DPAggPlan(noise_multiplier=z, sample_rate=0.5, releases=1, denominator=5.0,
                     planned_epsilon_prv=0.0, planned_epsilon_rdp=0.0)
    return DPAggTIStrategy(plan=plan, mechanism=GaussianSumMechanism(clip_norm=1.0, noise_multiplier=z),
                           noise=NoiseSource.seeded(0), ledger=PrivacyLedger(delta=1e-5), dim=DIM,
                           ledger_path=None if tmp_path is None else tmp_path / "ledger.json")


def test_zero_noise_release_is_sum_over_public_denominator(tmp_path):
    s = strategy(tmp_path=tmp_path)
    arrays, metrics = s.aggregate_train(1, [reply_with([1, 2, 3, 4]), reply_with([1, 0, 0, 1], node_id=2)])
    np.testing.assert_allclose(arrays[keys.EMBEDDING].numpy(), np.array([2, 2, 3, 5]) / 5.0)
    assert metrics["sites"] == 2
    assert len(s.ledger.events) == 1 and s.ledger.events[0].sample_rate == 0.5
    assert PrivacyLedger.load(tmp_path / "ledger.json").events == s.ledger.events


def test_bad_replies_are_left_out_with_a_generic_reason_and_logged_in_detail(caplog):
    s = strategy()
    with caplog.at_level("WARNING", logger="privadapt.server"):
        arrays, _ = s.aggregate_train(1, [reply_with([1, 1, 1, 1]), reply_with([np.nan, 0, 0, 0], node_id=7),
                                          reply_with([1, 2], node_id=8), reply_with([1, 1, 1, 1])])
    np.testing.assert_allclose(arrays[keys.EMBEDDING].numpy(), np.ones(4) / 5.0)
    reasons = [(r["node"], r["reason"]) for r in s.rejected]
    assert reasons == [(7, REPLY_MALFORMED), (8, REPLY_MALFORMED), (1, REPLY_UNASKED)]
    assert "node 7 left out: embedding-sum has NaN" in caplog.text and "node 8 left out: embedding-sum has shape" in caplog.text


def test_a_checkpoint_with_detailed_reasons_loads_them_as_generic(tmp_path):
    s = strategy()
    s.aggregate_train(1, [reply_with([1, 1, 1, 1])])
    state = s.state_dict()
    state["rejected"] = [{"release": 1, "node": 4, "reason": "site reported an error: site-2: /data/patient-0042.png"},
                         {"release": 1, "node": 5, "reason": REPLY_MALFORMED}]
    restored = strategy()
    restored.load_state_dict(state)
    assert [r["reason"] for r in restored.rejected] == [REPLY_REJECTED, REPLY_MALFORMED]


def test_no_valid_reply_spends_nothing():
    s = strategy()
    assert s.aggregate_train(1, [reply_with([np.inf, 0, 0, 0])]) == (None, None)
    assert s.ledger.events == []
    with pytest.raises(RuntimeError):
        s.mean_release()


def test_noise_is_added_once_with_the_planned_spread():
    z, reps = 2.0, 4000
    s = strategy(z=z)
    for r in range(reps):
        s.aggregate_train(r, [reply_with([0, 0, 0, 0]), reply_with([0, 0, 0, 0], node_id=2)])
    releases = torch.stack(s.releases)
    expected = z * 1.0 / 5.0
    # 16000 draws: the sample sd is within ~1.7% (3 sigma) of its target
    assert abs(releases.std().item() / expected - 1) < 0.03
    assert len(s.ledger.events) == reps


def test_read_site_sum_rejects_missing_key():
    msg = reply_with([1, 2, 3, 4])
    msg.content[keys.ARRAYS] = ArrayRecord(array_dict={"other": Array(np.zeros(4))})
    with pytest.raises(ReplyError, match="embedding-sum"):
        read_vector(msg, keys.EMBEDDING_SUM, DIM)
