"""Tests of server/lora_strategy.py: site-level DP-FedAvg of clipped LoRA deltas."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import Metadata

from common import keys
from common.dp import GaussianSumMechanism, NoiseSource, PrivacyEvent, PrivacyLedger
from common.dp.plan import DPSGDPlan, FedAvgPlan
from common.dp.sampling import sampling_generator
from common.lora import flat_norm
from common.paths import REPO_ROOT
from common.reasons import REPLY_MALFORMED, REPLY_REJECTED
from common.wire import record_tree
from server.lora_strategy import DPFedAvgLoRA
from server.strategy_base import RunControl, TooManySites
from tests.server.grids import PushPullGrid

SHAPES = {"unet.a.lora_A.weight": (2, 3), "unet.a.lora_B.weight": (3, 2)}


class FakeGrid:
    """Only what configure_train reads: the connected node ids."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def zeros():
    return {k: torch.zeros(s) for k, s in SHAPES.items()}


def tree(values: float | list, seed: int | None = None):
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        return {k: torch.randn(s, generator=g, dtype=torch.float64) * values for k, s in SHAPES.items()}
    return {k: torch.full(s, float(values), dtype=torch.float64) for k, s in SHAPES.items()}


def reply(delta: dict, node: int, metrics: dict | None = None) -> Message:
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="q",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    content = RecordDict({keys.ARRAYS: ArrayRecord(array_dict={k: Array(np.asarray(v, dtype=np.float32))
                                                               for k, v in delta.items()})})
    if metrics:
        content[keys.METRICS] = MetricRecord(metrics)
    return Message(content=content, metadata=meta)


def make(z=0.0, q=1.0, clip=1.0, private=True, sites=0, defense="none", ledger_path=None, **kw):
    plan = FedAvgPlan(noise_multiplier=z, sample_rate=q, rounds=1, planned_epsilon_prv=0.0, planned_epsilon_rdp=0.0)
    return DPFedAvgLoRA(plan=plan, mechanism=GaussianSumMechanism(clip_norm=clip, noise_multiplier=z),
                        noise=NoiseSource.seeded(0), sampling=sampling_generator(0),
                        ledger=PrivacyLedger(delta=1e-5), initial=zeros(), defense=defense, private=private,
                        num_sites=sites, ledger_path=ledger_path, **kw)


def start_round(s, rnd, nodes):
    return list(s.configure_train(rnd, ArrayRecord(), ConfigRecord(), FakeGrid(nodes)))


def test_zero_noise_aggregate_is_the_sum_over_the_expected_count(tmp_path):
    s = make(q=1.0, sites=4, ledger_path=tmp_path / "ledger.json")
    messages = start_round(s, 1, [1, 2, 3])
    assert {m.metadata.dst_node_id for m in messages} == {1, 2, 3}
    sent = record_tree(messages[0].content[keys.ARRAYS], s.shapes)  # packed: one Array
    assert set(sent) == set(SHAPES)
    d1, d2 = tree(0.1, seed=1), tree(0.05, seed=2)
    arrays, metrics = s.aggregate_train(1, [reply(d1, 1), reply(d2, 2)])
    # divided by q*K = 4 (declared K), not by the 2 that answered: uniform, fixed denominator
    for k in SHAPES:
        expected = ((d1[k].float().double() + d2[k].float().double()) / 4).float()
        torch.testing.assert_close(s.global_state[k], expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(arrays[k].numpy(), expected.numpy(), rtol=1e-6)
    assert metrics["sites"] == 2
    (event,) = s.ledger.events
    assert event.unit == "site" and event.sample_rate == 1.0 and event.sampling == "none"
    assert PrivacyLedger.load(tmp_path / "ledger.json").events == s.ledger.events


def test_later_rounds_write_their_sum_over_the_last_rounds_buffer():
    """Round 2's sum reuses round 1's float64 buffer (no new pages to fault in) and is still
    exactly round 2's: nothing of round 1 leaks into it."""
    s, fresh = make(sites=2), make(sites=2)
    start_round(s, 1, [1, 2])
    s.aggregate_train(1, [reply(tree(0.1, seed=1), 1), reply(tree(0.2, seed=2), 2)])
    buffer = s._sum_buffer
    assert buffer is not None
    deltas = [tree(0.05, seed=3), tree(0.3, seed=4)]
    start_round(s, 2, [1, 2])
    s.aggregate_train(2, [reply(d, n) for n, d in enumerate(deltas, 1)])
    assert s._sum_buffer is buffer
    start_round(fresh, 1, [1, 2])
    fresh.aggregate_train(1, [reply(d, n) for n, d in enumerate(deltas, 1)])
    for k in SHAPES:
        assert torch.equal(buffer[k], fresh._sum_buffer[k])


def test_a_private_run_needs_a_declared_k():
    with pytest.raises(ValueError, match="declared public number of sites K"):
        make(q=1.0, sites=0)
    make(private=False, sites=0)  # a non-private run takes the plain mean of the answers


def test_k_is_the_declared_one_whatever_connects():
    s = make(q=1.0, sites=5)
    start_round(s, 1, [1, 2, 3])  # fewer than declared: fine, the denominator stays q*K
    assert s.denominator == 5.0
    s.aggregate_train(1, [])
    with pytest.raises(TooManySites, match="6 sites are connected but num-sites declares 5"):
        start_round(s, 2, [1, 2, 3, 4, 5, 6])
    assert len(s.rounds) == 1 and len(s.ledger.events) == 1  # nothing sampled, nothing charged


def test_server_reclips_exactly_on_the_flat_norm():
    s = make(clip=1.0, sites=1)
    start_round(s, 1, [7])
    d = tree(0.0)
    d["unet.a.lora_A.weight"][0, 0] = 0.6
    d["unet.a.lora_B.weight"][0, 0] = 0.8  # flat norm exactly 1.0: within the bound, kept as is
    s.aggregate_train(1, [reply(d, 7)])
    assert s.global_state["unet.a.lora_A.weight"][0, 0].item() == pytest.approx(0.6, rel=1e-7)
    assert flat_norm(s.global_state) == pytest.approx(1.0, rel=1e-6)


def test_bad_replies_are_rejected_by_name_and_the_round_goes_on(caplog):
    caplog.set_level("WARNING", logger="privadapt.server")
    s = make(clip=1.0, sites=5)
    start_round(s, 1, [1, 2, 3, 4, 5])
    good = tree(0.1)
    nan = {**tree(0.1), "unet.a.lora_A.weight": torch.full((2, 3), float("nan"))}
    shape = {**tree(0.1), "unet.a.lora_B.weight": torch.zeros(2, 2)}
    missing = {"unet.a.lora_A.weight": torch.zeros(2, 3)}
    big = tree(1.0)  # norm sqrt(12) > C: an unclipped update
    s.aggregate_train(1, [reply(good, 1), reply(nan, 2), reply(shape, 3), reply(missing, 4), reply(big, 5),
                          reply(good, 9)])  # node 9 was never asked
    log = s.rounds[-1]
    reasons = {r["node"]: r["reason"] for r in log.rejected}
    assert reasons == {n: REPLY_MALFORMED for n in (2, 3, 4, 5)}  # what the outputs keep: generic
    for node, word in ((2, "NaN"), (3, "shape"), (4, "missing"), (5, "clip bound")):  # the server log: detailed
        assert any(f"node {node} left out" in m and word in m for m in caplog.messages), (node, word)
    assert list(log.used) == [1] and log.ignored == [9]
    torch.testing.assert_close(s.global_state["unet.a.lora_A.weight"], torch.full((2, 3), 0.1 / 5))


def test_round_without_replies_still_releases_noise_and_is_accounted():
    s = make(z=1.0, clip=0.5, sites=3)
    start_round(s, 1, [1, 2, 3])
    arrays, _ = s.aggregate_train(1, [])
    assert arrays is not None and flat_norm(s.global_state) > 0  # pure noise
    assert len(s.ledger.events) == 1 and s.rounds[-1].expected_noise_norm > 0


def test_noise_has_the_planned_spread():
    """Over many rounds with no signal, the global adapter's increments are N(0, (zC/(qK))^2)."""
    z, clip, q, sites = 2.0, 0.5, 0.5, 4
    s = make(z=z, q=q, clip=clip, sites=sites)
    increments = []
    for rnd in range(1, 1501):
        before = {k: v.clone() for k, v in s.global_state.items()}
        start_round(s, rnd, [1, 2, 3, 4])
        s.aggregate_train(rnd, [])
        increments.append(torch.cat([(s.global_state[k] - before[k]).double().flatten() for k in SHAPES]))
    x = torch.stack(increments).flatten()
    expected = z * clip / (q * sites)
    # 18,000 draws: the sample sd is within 2% (about 3 standard errors) of the target
    assert abs(x.std().item() / expected - 1) < 0.02
    assert abs(x.mean().item()) < 4 * expected / math.sqrt(x.numel())


def test_poisson_sampling_of_sites_has_rate_q():
    s = make(q=0.3, sites=10)
    counts = []
    for rnd in range(1, 401):
        counts.append(len(start_round(s, rnd, list(range(10)))))
        s.aggregate_train(rnd, [])
    mean = sum(counts) / len(counts)
    assert abs(mean - 3.0) < 4 * math.sqrt(10 * 0.3 * 0.7 / len(counts))
    assert min(counts) < 3 < max(counts)  # the number sampled varies: Poisson, not fixed size


def test_non_private_mode_is_the_plain_mean_without_clipping():
    s = make(private=False, sites=0)
    start_round(s, 1, [1, 2])
    s.aggregate_train(1, [reply(tree(3.0), 1), reply(tree(1.0), 2)])
    torch.testing.assert_close(s.global_state["unet.a.lora_A.weight"], torch.full((2, 3), 2.0))
    assert s.ledger.events == []


def test_dp_sgd_sites_add_record_level_events():
    s = make(z=1.0, sites=2, defense="dp-sgd")
    start_round(s, 1, [1, 2])
    report = {keys.SITE_EPSILON: 0.5, keys.SITE_NOISE_MULTIPLIER: 1.2, keys.SITE_SAMPLE_RATE: 0.25,
              keys.SITE_STEPS: 5, keys.SITE_INDEX: 0}
    s.aggregate_train(1, [reply(tree(0.01), 1, report), reply(tree(0.01), 2)])  # node 2 reports nothing
    units = sorted((e.unit, e.scope) for e in s.ledger.events)
    assert units == [("record", "site-0"), ("site", "all")]
    assert [r["node"] for r in s.rounds[-1].rejected] == [2]
    assert s.reported_record_epsilons == {"site-0": 0.5}


class DPSGDSites(PushPullGrid):
    """Two sites answering with a small delta and their DP-SGD report (z, q, steps)."""

    def __init__(self, report: dict) -> None:
        super().__init__([1, 2])
        self.report = report

    def answer(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        return reply(tree(0.01), node, {**self.report, keys.SITE_INDEX: node, keys.SITE_EPSILON: 1.0})


def test_the_record_level_budget_of_dp_sgd_sites_stops_the_run():
    """LoRA with DP-SGD sites: the server knows each site's record-level round (the plan) and
    stops before the round that would take a site past record-target-epsilon."""
    dpsgd = DPSGDPlan(noise_multiplier=1.0, sample_rate=0.5, steps_per_round=2, rounds=3, declared_site_size=8,
                      expected_batch_size=4.0, planned_epsilon_prv=0.0, planned_epsilon_rdp=0.0)
    two, three = (PrivacyLedger(1e-5, [PrivacyEvent(1.0, 0.5, 2 * r)]).epsilon("record") for r in (2, 3))
    s = make(z=1.0, sites=2, defense="dp-sgd", dpsgd=dpsgd,
             control=RunControl(delta=1e-5, other_targets=(("record", (two + three) / 2),)))
    report = {keys.SITE_NOISE_MULTIPLIER: 1.0, keys.SITE_SAMPLE_RATE: 0.5, keys.SITE_STEPS: 2}
    s.start(grid=DPSGDSites(report), initial_arrays=s.current_arrays(), num_rounds=3, timeout=5.0,
            train_config=ConfigRecord())
    assert "round 3: stopping before it spends" in s.stopped and "record-level epsilon" in s.stopped
    assert len(s.rounds) == 2 and s.ledger.epsilon("record") == pytest.approx(two)
    assert [e.unit for e in s.ledger.events].count("site") == 2


def test_a_dp_sgd_report_that_is_not_the_plan_is_charged_and_left_out(caplog):
    caplog.set_level("WARNING", logger="privadapt.server")
    dpsgd = DPSGDPlan(noise_multiplier=1.0, sample_rate=0.5, steps_per_round=2, rounds=3, declared_site_size=8,
                      expected_batch_size=4.0, planned_epsilon_prv=0.0, planned_epsilon_rdp=0.0)
    s = make(z=1.0, sites=2, defense="dp-sgd", dpsgd=dpsgd)
    start_round(s, 1, [1, 2])
    report = {keys.SITE_EPSILON: 0.5, keys.SITE_NOISE_MULTIPLIER: 1.0, keys.SITE_STEPS: 2}
    s.aggregate_train(1, [reply(tree(0.01), 1, {**report, keys.SITE_SAMPLE_RATE: 0.5, keys.SITE_INDEX: 0}),
                          reply(tree(0.01), 2, {**report, keys.SITE_SAMPLE_RATE: 0.75, keys.SITE_INDEX: 1})])
    assert list(s.rounds[-1].used) == [1] and s.rounds[-1].rejected[0]["reason"] == REPLY_MALFORMED  # generic
    assert any("node 2 left out" in m and "not the plan's" in m for m in caplog.messages)  # server log only
    assert sorted(e.scope for e in s.ledger.events if e.unit == "record") == ["site-0", "site-1"]


def reference_rows():
    with open(REPO_ROOT / "tests/data/accountant_values.csv") as f:
        return [r for r in csv.DictReader(f) if int(r["steps"]) <= 100]


@pytest.mark.parametrize("row", reference_rows(), ids=lambda r: f"q{r['sample_rate']}-z{r['noise_multiplier']}-T{r['steps']}")
def test_site_level_epsilon_over_t_rounds_matches_the_reference(row):
    q, z, rounds = float(row["sample_rate"]), float(row["noise_multiplier"]), int(row["steps"])
    s = make(z=z, q=q, sites=1)
    for rnd in range(1, rounds + 1):
        start_round(s, rnd, [1])
        s.aggregate_train(rnd, [])
    assert len(s.ledger.events) == rounds
    assert all(e == PrivacyEvent(z, q, 1, unit="site", label=e.label) for e in s.ledger.events)
    delta = float(row["delta"])
    s.ledger.delta = delta
    assert s.ledger.epsilon("site", "rdp") == pytest.approx(float(row["eps_opacus_rdp"]), rel=2e-3, abs=2e-3)
    assert s.ledger.epsilon("site", "prv") == pytest.approx(float(row["eps_opacus_prv"]), rel=2e-2, abs=2e-2)


def test_round_logs_of_older_checkpoints_still_load():
    """Checkpoints written before the diagnostics were kept in columns hold a dict per site."""
    from server.lora_strategy import RoundLog

    older = {"round": 1, "sampled": [1, 2, 3], "used": [1, 2], "rejected": [{"node": 3, "reason": "nan"}],
             "ignored": [], "expected_noise_norm": 0.5, "update_norm": 0.1, "achieved_noise_multiplier": None,
             "diagnostics": {1: {keys.DIAG_LOSS: 0.2}, 2: {keys.DIAG_LOSS: 0.4, keys.DIAG_CLIPPED: 1.0}}, "short": False}
    log = RoundLog.from_state(older)
    assert log.rejected == [{"node": 3, "reason": REPLY_REJECTED}]  # an old free text is not carried on
    summary = log.summary()
    assert summary["adaptation_loss"] == 0.3 and summary["fraction_clipped"] == 1.0
    assert summary["attacker_accuracy"] is None and summary["sites_used"] == 2
    assert RoundLog.from_state(log.to_state()).summary() == summary
