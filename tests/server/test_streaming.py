"""Tests of server/streaming.py: replies reach the aggregation one at a time, none is kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Message, RecordDict

from common import keys
from common.dp import GaussianSumMechanism, NoiseSource, PrivacyLedger
from common.dp.plan import DPAggPlan, FedAvgPlan
from common.dp.sampling import sampling_generator
from server.dpagg_strategy import DPAggTIStrategy
from server.dpsgd_strategy import DPSGDTIStrategy
from server.lora_strategy import DPFedAvgLoRA
from server.streaming import PULL_BATCH, ReceiveStats, pull_drained, stream_replies
from tests.server.grids import ReplayGrid, dpagg_answer, lora_answer

SHAPES = {"unet.a.lora_A.weight": (2, 3), "unet.a.lora_B.weight": (3, 2)}
SITES = 60


def train_messages(grid: ReplayGrid) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=n, message_type="train") for n in grid.get_node_ids()]


def lora_strategy(sites: int = SITES) -> DPFedAvgLoRA:
    """A private zero-noise LoRA strategy declaring ``sites`` sites (K)."""
    plan = FedAvgPlan(noise_multiplier=0.0, sample_rate=1.0, rounds=1, planned_epsilon_prv=0.0, planned_epsilon_rdp=0.0)
    return DPFedAvgLoRA(plan=plan, mechanism=GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0),
                        noise=NoiseSource.seeded(0), sampling=sampling_generator(0), ledger=PrivacyLedger(delta=1e-5),
                        initial={k: torch.zeros(s) for k, s in SHAPES.items()}, defense="none", private=True,
                        num_sites=sites)


def test_every_reply_is_yielded_once_and_the_stats_count_them():
    grid = ReplayGrid(SITES, dpagg_answer(4, 1.0))
    stats = ReceiveStats()
    nodes = [reply.metadata.src_node_id for reply in stream_replies(grid, train_messages(grid), 10.0, stats=stats)]
    assert sorted(nodes) == list(range(1, SITES + 1))
    assert (stats.sent, stats.received, stats.timed_out) == (SITES, SITES, [])
    assert stats.pulls >= SITES // PULL_BATCH
    assert grid.pending == 0  # pulled replies are gone from the grid's store


def test_no_messages_push_nothing_and_yield_nothing():
    grid = ReplayGrid(3, dpagg_answer(4, 1.0))
    assert list(stream_replies(grid, [], 1.0)) == []
    assert grid.pushed == 0


def test_missing_replies_end_the_round_at_the_timeout():
    grid = ReplayGrid(5, dpagg_answer(4, 1.0))
    messages = train_messages(grid)
    silent = {2, 4}
    pull = grid.pull_messages
    grid.pull_messages = lambda ids: pull([i for i in ids if grid.sequence(i) not in silent])
    stats = ReceiveStats()
    got = sorted(r.metadata.src_node_id for r in stream_replies(grid, messages, 0.3, stats=stats))
    assert got == [1, 3, 5]
    assert len(stats.timed_out) == 2 and 0.3 <= stats.seconds < 3.0


def test_the_stream_says_when_its_next_reply_needs_a_new_pull():
    """``buffered``: replies pulled and not yet handed over (a blocked sum adds its block at 0)."""
    grid = ReplayGrid(10, dpagg_answer(4, 1.0))
    stream = stream_replies(grid, train_messages(grid), 10.0, batch=4)
    assert [stream.buffered for _ in stream] == [3, 2, 1, 0, 3, 2, 1, 0, 1, 0]
    assert pull_drained(stream) and not pull_drained([])


def test_bad_arguments_are_refused():
    grid = ReplayGrid(2, dpagg_answer(4, 1.0))
    with pytest.raises(ValueError, match="batch"):
        list(stream_replies(grid, [], 1.0, batch=0))
    with pytest.raises(ValueError, match="timeout"):
        list(stream_replies(grid, [], -1.0))


@pytest.mark.parametrize("method", ["lora", "dpagg", "dpsgd"])
def test_a_round_holds_a_bounded_number_of_replies_whatever_the_site_count(method):
    if method == "lora":
        strategy, answer = lora_strategy(), lora_answer(SHAPES, 1.0)
    elif method == "dpagg":
        plan = DPAggPlan(noise_multiplier=0.0, sample_rate=1.0, releases=1, denominator=float(SITES),
                         planned_epsilon_prv=0.0, planned_epsilon_rdp=0.0)
        strategy = DPAggTIStrategy(plan=plan, mechanism=GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0),
                                   noise=NoiseSource.seeded(0), ledger=PrivacyLedger(delta=1e-5), dim=4)
        answer = dpagg_answer(4, 1.0)
    else:
        strategy = DPSGDTIStrategy(ledger=PrivacyLedger(delta=1e-5), initial=torch.zeros(4))

        def answer(msg: Message) -> RecordDict:
            from flwr.app import Array, ArrayRecord, MetricRecord

            node = msg.metadata.dst_node_id
            return RecordDict({
                keys.ARRAYS: ArrayRecord(array_dict={keys.EMBEDDING: Array(np.full(4, float(node), np.float32))}),
                keys.METRICS: MetricRecord({keys.SITE_EPSILON: 1.0, keys.SITE_NOISE_MULTIPLIER: 1.0,
                                            keys.SITE_SAMPLE_RATE: 0.5, keys.SITE_STEPS: 1, keys.SITE_INDEX: node}),
            })
    grid = ReplayGrid(SITES, answer)
    from flwr.app import ArrayRecord

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=1, timeout=60.0)
    assert result.train_metrics_clientapp[1]["sites"] == SITES  # every reply entered the aggregate
    assert grid.max_live <= PULL_BATCH  # ... but never more than one pull's worth at once
    assert grid.live == 0
    if method == "dpsgd":  # the uniform mean of 1..SITES, from a running sum
        assert torch.allclose(strategy.global_embedding, torch.full((4,), (SITES + 1) / 2))


def test_flowers_send_and_receive_holds_every_reply_which_streaming_avoids():
    """The comparison that makes the bound above meaningful: the same round through
    send_and_receive keeps all SITES replies alive at once."""
    grid = ReplayGrid(SITES, lora_answer(SHAPES, 1.0))
    replies = grid.send_and_receive(train_messages(grid))
    assert grid.max_live == SITES
    del replies
