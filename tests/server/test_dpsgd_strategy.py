"""Tests of server/dpsgd_strategy.py: the federated DP-SGD textual-inversion baseline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from common import keys
from common.config import RunConfig
from common.dp import PrivacyEvent, PrivacyLedger, epsilon
from common.dp.plan import DPSGDPlan
from common.models import load_pipeline
from common.reasons import REJECTION_REASONS, REPLY_MALFORMED, REPLY_SITE_ERROR
from server.dpagg_strategy import ReplyError
from server.dpsgd_strategy import DPSGDTIStrategy, embedding_record, read_site_report, run_dpsgd_baseline
from server.strategy_base import RunControl
from tests.server.grids import PushPullGrid

DIM = 4
DELTA = 1e-5


class FakeGrid(PushPullGrid):
    """``answer(msg)`` plays the site when its reply is pulled."""

    def __init__(self, node_ids, answer=None) -> None:
        super().__init__(node_ids)
        self.site = answer

    def answer(self, message: Message) -> Message:
        return self.site(message)


def instruction(node_id: int, server_round: int = 1) -> Message:
    """A train message to ``node_id``, as configure_train builds it."""
    s = strategy()
    return list(s.configure_train(server_round, ArrayRecord(), ConfigRecord(), FakeGrid([node_id])))[0]


def reply(node_id, vector, *, index=None, z=1.0, q=0.5, steps=2, eps=3.0, metrics=True) -> Message:
    """A site's reply to a train message (metadata derived from the instruction, as Flower does)."""
    embedding = Array(np.asarray(vector, dtype=np.float32))
    content = RecordDict({keys.ARRAYS: ArrayRecord(array_dict={keys.EMBEDDING: embedding})})
    if metrics:
        content[keys.METRICS] = MetricRecord({
            keys.SITE_EPSILON: eps, keys.SITE_NOISE_MULTIPLIER: z, keys.SITE_SAMPLE_RATE: q,
            keys.SITE_STEPS: steps, keys.SITE_INDEX: node_id if index is None else index,
        })
    return Message(content=content, reply_to=instruction(node_id))


def error_reply(node_id: int) -> Message:
    return Message(Error(code=0, reason="site 5: out of memory"), reply_to=instruction(node_id))


def strategy(tmp_path=None) -> DPSGDTIStrategy:
    return DPSGDTIStrategy(ledger=PrivacyLedger(delta=DELTA), initial=torch.zeros(DIM),
                           ledger_path=None if tmp_path is None else tmp_path / "ledger.json")


def test_configure_train_sends_the_global_embedding_to_every_node():
    s = strategy()
    arrays = ArrayRecord(array_dict={keys.EMBEDDING: Array(np.arange(DIM, dtype=np.float32))})
    msgs = list(s.configure_train(3, arrays, ConfigRecord(), FakeGrid([11, 12, 13])))
    assert [m.metadata.dst_node_id for m in msgs] == [11, 12, 13]
    for m in msgs:
        assert m.metadata.message_type == "train"
        emb = m.content[keys.ARRAYS][keys.EMBEDDING].numpy()
        assert emb.dtype == np.float32 and emb.tolist() == [0, 1, 2, 3]
        assert m.content[keys.CONFIG][keys.ROUND] == 3 and m.content[keys.CONFIG][keys.METHOD] == "dp-sgd"


def test_uniform_mean_and_one_ledger_event_per_site(tmp_path):
    s = strategy(tmp_path)
    arrays, metrics = s.aggregate_train(1, [reply(1, [1, 2, 3, 4], q=0.5), reply(2, [3, 2, 1, 0], q=0.25, steps=3)])
    # uniform, never weighted by the sites' sample rates or image counts
    np.testing.assert_allclose(arrays[keys.EMBEDDING].numpy(), [2, 2, 2, 2])
    assert arrays[keys.EMBEDDING].numpy().dtype == np.float32
    assert metrics["sites"] == 2
    assert torch.equal(s.global_embedding, torch.full((DIM,), 2.0))
    events = s.ledger.events
    assert [(e.scope, e.noise_multiplier, e.sample_rate, e.steps, e.unit) for e in events] == [
        ("site-1", 1.0, 0.5, 2, "record"), ("site-2", 1.0, 0.25, 3, "record")]
    assert PrivacyLedger.load(tmp_path / "ledger.json").events == events


def test_sites_compose_over_rounds_and_in_parallel_across_sites(tmp_path):
    s = strategy(tmp_path)
    for r in (1, 2):
        s.aggregate_train(r, [reply(1, [1, 1, 1, 1], q=0.5), reply(2, [0, 0, 0, 0], q=0.1)])
    site1 = [e for e in s.ledger.events if e.scope == "site-1"]
    site2 = [e for e in s.ledger.events if e.scope == "site-2"]
    assert len(site1) == len(site2) == 2
    eps1, eps2 = epsilon(site1, DELTA, "rdp"), epsilon(site2, DELTA, "rdp")
    assert eps1 > eps2 > 0
    # the run's epsilon is the worst site's, not the composition of all events
    assert s.ledger.epsilon("record", "rdp") == pytest.approx(eps1)
    assert eps1 < epsilon(s.ledger.events, DELTA, "rdp")
    assert len(PrivacyLedger.load(tmp_path / "ledger.json").events) == 4


def test_bad_replies_are_rejected_and_logged_with_the_node(caplog):
    s = strategy()
    replies = [
        reply(1, [1, 1, 1, 1]),
        reply(7, [np.nan, 0, 0, 0]),  # NaN: left out of the mean, but its privacy spend is recorded
        reply(8, [1, 2]),  # wrong shape
        error_reply(9),
        reply(10, [5, 5, 5, 5], metrics=False),  # cannot be accounted: left out
        reply(11, [5, 5, 5, 5], q=1.5),  # impossible sample rate
    ]
    with caplog.at_level("WARNING", logger="privadapt.server"):
        arrays, metrics = s.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays[keys.EMBEDDING].numpy(), [1, 1, 1, 1])
    assert metrics["sites"] == 1
    reasons = {r["node"]: r["reason"] for r in s.rejected}
    assert reasons == {7: REPLY_MALFORMED, 8: REPLY_MALFORMED, 9: REPLY_SITE_ERROR, 10: REPLY_MALFORMED,
                       11: REPLY_MALFORMED}
    assert all(f"node {n} left out" in caplog.text for n in reasons)
    # the server's own findings are in its log; the site's error text is nowhere
    assert "NaN" in caplog.text and "shape" in caplog.text and "sample-rate" in caplog.text
    assert "out of memory" not in caplog.text and "site 5" not in caplog.text
    assert sorted(e.scope for e in s.ledger.events) == ["site-1", "site-7", "site-8"]
    assert [list(c) for c in s.contributors] == [[1]]


def test_no_valid_reply_keeps_the_global_embedding():
    s = strategy()
    assert s.aggregate_train(1, [reply(3, [np.inf, 0, 0, 0]), error_reply(4)]) == (None, None)
    assert torch.equal(s.global_embedding, torch.zeros(DIM))
    assert [list(c) for c in s.contributors] == [[]]


def test_read_site_report_checks_every_field():
    good = read_site_report(reply(2, [0, 0, 0, 0], z=0.0, eps=math.inf))
    assert (good.index, good.noise_multiplier, good.epsilon) == (2, 0.0, math.inf)
    for bad in (dict(z=-1.0), dict(z=math.nan), dict(q=0.0), dict(steps=0), dict(index=-1), dict(eps=math.nan)):
        with pytest.raises(ReplyError):
            read_site_report(reply(2, [0, 0, 0, 0], **bad))


# ---- the whole baseline, with the real ClientApp code on a tiny model ---------------------

def test_run_dpsgd_baseline_end_to_end(tiny_sd_path, tmp_path):
    from client.app import handle_train

    cfg = RunConfig(ti_method="dp-sgd", model_path=str(tiny_sd_path), device="cpu", target_epsilon=50.0,
                    noise_multiplier=1.0, dpsgd_rounds=2, dpsgd_local_steps=1, dpsgd_batch_size=4,
                    dpsgd_max_grad_norm=0.1, learning_rate=5e-2, output_dir=str(tmp_path), site_dataset_size=12)
    contexts = {
        node: Context(run_id=1, node_id=node, node_config={"partition-id": i}, state=RecordDict(),
                      run_config=cfg.to_run_config())
        for i, node in enumerate((101, 102))
    }
    grid = FakeGrid(contexts, answer=lambda msg: handle_train(msg, contexts[msg.metadata.dst_node_id]))
    pipe = load_pipeline(tiny_sd_path, device="cpu")

    result = run_dpsgd_baseline(grid, cfg, tmp_path, pipe)

    vector, privacy, metrics = result["vector"], result["privacy"], result["metrics"]
    assert vector.shape == (privacy["adapter"]["dim"],) and torch.isfinite(vector).all()
    assert metrics["cosine_to_initializer"] < 1.0
    assert privacy["num_releases"] == 2 and privacy["sites_per_release"] == [2, 2] and privacy["num_sites"] == 2
    assert privacy["rejected_replies"] == []
    assert privacy["clip_norm"] == 0.1 and privacy["noise_multiplier"] == 1.0
    assert privacy["sample_rate"] == pytest.approx(4 / 12)  # declared site-dataset-size 12 (data/demo holds 12 per site)
    # per site: 2 rounds x 1 step of (z=1, q=1/3); the sites' own accountants agree with the ledger
    events = [PrivacyEvent(noise_multiplier=1.0, sample_rate=4 / 12, steps=1)] * 2
    expected = epsilon(events, DELTA, "prv")
    assert privacy["epsilon"]["prv"] == pytest.approx(expected, rel=1e-5)
    for scope in ("site-0", "site-1"):
        assert metrics["site_record_epsilon_reported"][scope] == pytest.approx(expected, rel=1e-5)
        assert privacy["site_epsilon"]["prv"][scope] == pytest.approx(expected, rel=1e-5)
    assert len(PrivacyLedger.load(tmp_path / "ledger.json").events) == 4
    json.dumps(privacy, allow_nan=False), json.dumps(metrics, allow_nan=False)  # JSON has no infinity
    # the sites' accountants persisted in their node state
    for ctx in contexts.values():
        assert len(json.loads(ctx.state["privadapt-dpsgd"]["history"])) == 2
    # every train message carried the current global embedding
    sent = [m.content[keys.ARRAYS][keys.EMBEDDING].numpy() for m in grid.sent]
    assert len(sent) == 4 and np.array_equal(sent[0], sent[1]) and not np.array_equal(sent[0], sent[2])


# ---- the server plans, checks and bounds what the sites spend ------------------------------

def dpsgd_plan(z=1.0, q=0.5, steps=2, rounds=3) -> DPSGDPlan:
    return DPSGDPlan(noise_multiplier=z, sample_rate=q, steps_per_round=steps, rounds=rounds, declared_site_size=8,
                     expected_batch_size=q * 8, planned_epsilon_prv=0.0, planned_epsilon_rdp=0.0)


def test_the_server_stops_before_a_round_would_take_a_site_past_the_target(tmp_path):
    """Two rounds of (z=1, q=0.5, 2 steps) fit under the target, a third would not: the run
    stops before round 3 is sent, with what rounds 1 and 2 released and accounted."""
    two, three = (epsilon([PrivacyEvent(1.0, 0.5, 2 * r)], DELTA) for r in (2, 3))
    target = (two + three) / 2
    s = DPSGDTIStrategy(ledger=PrivacyLedger(delta=DELTA), initial=torch.zeros(DIM), plan=dpsgd_plan(),
                        control=RunControl(target_epsilon=target, delta=DELTA, unit="record"))
    grid = FakeGrid([1, 2], answer=lambda m: reply(m.metadata.dst_node_id, [1, 1, 1, 1], z=1.0, q=0.5, steps=2))
    s.start(grid=grid, initial_arrays=embedding_record(torch.zeros(DIM)), num_rounds=3, timeout=5.0)
    assert "round 3: stopping before it spends" in s.stopped and f"above target-epsilon {target:g}" in s.stopped
    assert len(s.contributors) == 2 and len(grid.sent) == 4  # round 3 asked nobody
    assert s.ledger.epsilon("record") == pytest.approx(two) and s.ledger.epsilon("record") <= target


def test_a_report_that_is_not_the_plan_is_charged_and_left_out(caplog):
    caplog.set_level("WARNING", logger="privadapt.server")
    s = DPSGDTIStrategy(ledger=PrivacyLedger(delta=DELTA), initial=torch.zeros(DIM), plan=dpsgd_plan())
    arrays, metrics = s.aggregate_train(1, [reply(1, [1, 1, 1, 1], z=1.0, q=0.5, steps=2),
                                            reply(2, [3, 3, 3, 3], z=1.0, q=0.75, steps=2)])  # q = B / n: not the plan's
    np.testing.assert_allclose(arrays[keys.EMBEDDING].numpy(), [1, 1, 1, 1])
    assert [r["node"] for r in s.rejected] == [2] and s.rejected[0]["reason"] in REJECTION_REASONS  # generic
    assert any("node 2 left out" in m and "not the plan's" in m for m in caplog.messages)  # detailed, server log only
    assert sorted(e.scope for e in s.ledger.events) == ["site-1", "site-2"]  # its spend is recorded all the same
