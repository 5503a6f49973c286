"""Tests of server/blocks.py: checked replies summed a block at a time, as the strategies do.

The sums are compared bit for bit with the one-record-at-a-time reference arithmetic
(``add(total, bound_tree(record))`` for DP-FedAvg, ``add`` for DPAgg-TI site sums), with
rejected replies anywhere in a block, and the blocks are checked to follow the pulls.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import Metadata

from common import keys
from common.dp import GaussianSumMechanism, NoiseSource, PrivacyLedger
from common.dp.plan import DPAggPlan, FedAvgPlan
from common.dp.sampling import sampling_generator
from server.blocks import BLOCK, BlockedSum
from server.dpagg_strategy import DPAggTIStrategy
from server.lora_strategy import DPFedAvgLoRA
from server.replies import read_vector
from server.streaming import PULL_BATCH, stream_replies
from tests.server.grids import ReplayGrid, dpagg_answer

SHAPES = {"a.lora_A.weight": (4, 30), "a.lora_B.weight": (30, 4), "b.lora_A.weight": (4, 7), "b.lora_B.weight": (7, 4)}
SEEN: list[dict[str, torch.Tensor]] = []  # the totals handed to release, in order


class SpyMechanism(GaussianSumMechanism):
    """The mechanism, recording each total it releases and each block it adds."""

    blocks: list[int] = []

    def release(self, total, **kwargs):
        SEEN.append({k: v.clone() for k, v in total.items()})
        return super().release(total, **kwargs)

    def add_bounded_block(self, total, records, norms=None, *, out=None):
        SpyMechanism.blocks.append(len(records))
        return super().add_bounded_block(total, records, norms, out=out)

    @staticmethod
    def add_block(total, parts, *, out=None):
        SpyMechanism.blocks.append(len(parts))
        return GaussianSumMechanism.add_block(total, parts, out=out)


@pytest.fixture(autouse=True)
def fresh_spy():
    SEEN.clear()
    SpyMechanism.blocks = []


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int64)


def message(arrays: dict[str, np.ndarray], node: int) -> Message:
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=f"q{node}",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    return Message(content=RecordDict({keys.ARRAYS: ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()})}),
                   metadata=meta)


def delta(node: int, norm: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(node)
    tree = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    scale = norm / math.sqrt(sum(float((v ** 2).sum()) for v in tree.values()))
    return {k: (v * scale).astype(np.float32) for k, v in tree.items()}


def lora(sites: int) -> DPFedAvgLoRA:
    plan = FedAvgPlan(noise_multiplier=0.0, sample_rate=1.0, rounds=1, planned_epsilon_prv=0.0, planned_epsilon_rdp=0.0)
    return DPFedAvgLoRA(plan=plan, mechanism=SpyMechanism(clip_norm=1.0, noise_multiplier=0.0),
                        noise=NoiseSource.seeded(0), sampling=sampling_generator(0), ledger=PrivacyLedger(delta=1e-5),
                        initial={k: torch.zeros(s) for k, s in SHAPES.items()}, defense="none", private=True,
                        num_sites=sites)


class Nodes:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def test_lora_rounds_sum_blocks_as_one_record_at_a_time_and_rejects_outside_them():
    """20 replies (three blocks), norms within C, at C up to float32 rounding, and above it
    (re-clipped); a NaN reply and one above C(1 + 1e-5) in the middle of a block. The total
    released is the reference sum of the 18 valid ones, in order, bit for bit."""
    sites = 20
    s = lora(sites)
    s.configure_train(1, ArrayRecord(), ConfigRecord(), Nodes(sites))
    deltas = {node: delta(node, (0.5, 1.0, 1.0 + 5e-6)[node % 3]) for node in range(1, sites + 1)}
    deltas[6]["a.lora_A.weight"][1, 2] = np.nan
    deltas[11] = {k: v * np.float32(1.01) for k, v in delta(11, 1.0).items()}
    s.aggregate_train(1, [message(deltas[node], node) for node in range(1, sites + 1)])
    entry = s.rounds[-1]
    assert [r["node"] for r in entry.rejected] == [6, 11]
    assert list(entry.used) == [n for n in range(1, sites + 1) if n not in (6, 11)]
    assert SpyMechanism.blocks == [BLOCK, BLOCK, 2]  # checked replies, 8 at a time, the rest at the end
    m = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0)
    reference = None
    for node in entry.used:
        reference = m.add(reference, m.bound_tree({k: torch.from_numpy(v) for k, v in deltas[node].items()}))
    (total,) = SEEN
    for k in SHAPES:
        assert torch.equal(_bits(total[k]), _bits(reference[k])), k


def test_dpagg_releases_the_one_by_one_sum_of_the_valid_site_sums():
    plan = DPAggPlan(noise_multiplier=0.0, sample_rate=1.0, releases=1, denominator=12.0,
                     planned_epsilon_prv=0.0, planned_epsilon_rdp=0.0)
    s = DPAggTIStrategy(plan=plan, mechanism=SpyMechanism(clip_norm=1.0, noise_multiplier=0.0),
                        noise=NoiseSource.seeded(0), ledger=PrivacyLedger(delta=1e-5), dim=5)
    rng = np.random.default_rng(0)
    sums = {node: (rng.standard_normal(5) * 10 ** rng.uniform(-3, 3, 5)).astype(np.float32) for node in range(1, 13)}
    sums[4][0] = np.inf
    replies = [message({keys.EMBEDDING_SUM: sums[node]}, node) for node in range(1, 13)]
    s.aggregate_train(1, replies)
    assert list(s.contributors[-1]) == [n for n in range(1, 13) if n != 4] and s.rejected[0]["node"] == 4
    assert SpyMechanism.blocks == [BLOCK, 3]
    reference = None
    for reply in replies[:3] + replies[4:]:
        reference = GaussianSumMechanism.add(reference, {keys.EMBEDDING_SUM: read_vector(reply, keys.EMBEDDING_SUM, 5)})
    (total,) = SEEN
    assert torch.equal(_bits(total[keys.EMBEDDING_SUM]), _bits(reference[keys.EMBEDDING_SUM]))
    assert torch.equal(s.releases[-1], reference[keys.EMBEDDING_SUM] / 12.0)


def test_blocks_are_added_when_the_stream_needs_a_new_pull():
    """From a reply stream, a block is added as soon as its pull is used up (so no block
    outlives a pull), whatever the block size; from a list, every ``size`` records."""
    grid = ReplayGrid(20, dpagg_answer(4, 1.0))
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in grid.get_node_ids()]
    sums = BlockedSum(SpyMechanism(clip_norm=1.0, noise_multiplier=0.0), bounded=False, size=100)
    for reply in sums.receive(stream_replies(grid, messages, 10.0, batch=PULL_BATCH)):
        sums.add(reply, {keys.EMBEDDING_SUM: read_vector(reply, keys.EMBEDDING_SUM, 4).numpy()})
        assert grid.live <= PULL_BATCH  # the block's replies included: never more than one pull
    assert sums.result() is not None and SpyMechanism.blocks == [8, 8, 4]
    SpyMechanism.blocks = []
    listed = BlockedSum(SpyMechanism(clip_norm=1.0, noise_multiplier=0.0), bounded=False, size=3)
    for value in range(7):
        listed.add(None, {"v": np.full(2, value, np.float32)})
    assert SpyMechanism.blocks == [3, 3] and torch.equal(listed.result()["v"], torch.full((2,), 21.0, dtype=torch.float64))
    assert SpyMechanism.blocks == [3, 3, 1]


def test_a_bounded_sum_needs_the_norms():
    sums = BlockedSum(GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0), bounded=True)
    with pytest.raises(ValueError, match="norm"):
        sums.add(None, {"v": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="size"):
        BlockedSum(GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0), bounded=True, size=0)
    assert sums.result() is None
