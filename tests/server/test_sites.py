"""Tests of server/sites.py: what the server keeps per site stays small and says the same."""

from __future__ import annotations

import gc
import hashlib
import io
import math
import tracemalloc
import uuid
import weakref
from array import array

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from common import keys
from common.dp import GaussianSumMechanism, NoiseSource, PrivacyLedger
from common.dp.plan import DPAggPlan
from server.dpagg_strategy import DPAggTIStrategy
from server.sites import NODE_ARRAY, Instructions, MessageIds, NodeSet, SiteDiagnostics, node_array, push_in_batches
from tests.server.grids import ReplayGrid, dpagg_answer, lora_answer, set_task_identity
from tests.server.test_streaming import SHAPES, lora_strategy


class CountingGrid:
    """Records every push call; keeps nothing of the messages (as a SuperLink elsewhere)."""

    def __init__(self, fail: frozenset[int] = frozenset()) -> None:
        self.calls: list[int] = []
        self.fail = fail  # destinations the grid cannot push to (the HTTP grid's None)
        self.alive = 0
        self.max_alive = 0

    def _gone(self) -> None:
        self.alive -= 1

    def track(self, msg: Message) -> Message:
        self.alive += 1
        self.max_alive = max(self.max_alive, self.alive)
        weakref.finalize(msg, self._gone)
        return msg

    def push_messages(self, messages):
        messages = list(messages)  # as the HTTP grid does: it walks the batch twice
        self.calls.append(len(messages))
        return [None if m.metadata.dst_node_id in self.fail else f"id-{m.metadata.dst_node_id}" for m in messages]


def test_instructions_are_built_when_iterated_and_share_one_content():
    content = RecordDict({keys.CONFIG: ConfigRecord({"a": 1})})
    ins = Instructions([3, 1, 2], content)
    assert len(ins) == 3
    first, again = list(ins), list(ins)
    assert [m.metadata.dst_node_id for m in first] == [3, 1, 2] == [m.metadata.dst_node_id for m in again]
    assert all(m.content is content and m.metadata.message_type == "train" for m in first)
    assert first[0] is not again[0]  # fresh messages each time: the grid writes its id into each


@pytest.mark.parametrize("n", [0, 1, 5, 8, 17])
def test_push_in_batches_pushes_everything_in_order_at_most_a_batch_at_a_time(n):
    grid = CountingGrid(fail=frozenset({2}))
    messages = (grid.track(m) for m in Instructions(list(range(1, n + 1)), RecordDict()))
    ids = push_in_batches(grid, messages, batch=4)
    assert list(ids) == [f"id-{i}" for i in range(1, n + 1) if i != 2]  # None (not pushed) left out
    assert sum(grid.calls) == n and all(c <= 4 for c in grid.calls)
    assert len(grid.calls) == max(1, math.ceil(n / 4))  # an empty round still pushes once, as before; no empty tail
    assert grid.max_alive <= 4 + 1  # one batch, and the message being built for the next
    with pytest.raises(ValueError, match="batch"):
        push_in_batches(grid, [], batch=0)


def _uuids(n):
    return [str(uuid.uuid4()) for _ in range(n)]  # what InMemoryGrid gives


def _object_ids(n):
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]  # the HTTP grid's


@pytest.mark.parametrize("make", [_uuids, _object_ids])
def test_message_ids_give_back_the_same_strings_first_in_first_out(make):
    ids = make(3000)
    queue = MessageIds(ids[:10])
    out = []
    for mid in ids[10:]:  # interleaved: the front is dropped and the buffer compacted on the way
        queue.append(mid)
        out.append(queue.popleft())
    assert len(queue) == 10 and list(queue) == ids[-10:]
    out += [queue.popleft() for _ in range(10)]
    assert out == ids and len(queue) == 0 and not queue
    with pytest.raises(IndexError):
        queue.popleft()


@pytest.mark.parametrize("odd", ["ABCDEF01" * 8, "not-an-id", "ab" * 16, "", "6e" + "f" * 62])
def test_an_id_that_does_not_fit_the_packing_keeps_every_id_exactly(odd):
    """Upper-case hex, another format, another length, empty (or an id that fits after all):
    the exact strings come back, in order."""
    ids = _object_ids(5)
    queue = MessageIds(ids[:3])
    queue.append(odd)
    queue.extend(ids[3:])
    assert list(queue) == ids[:3] + [odd] + ids[3:]
    assert [queue.popleft() for _ in range(len(queue))] == ids[:3] + [odd] + ids[3:]
    shouting = [str(uuid.uuid4()).upper(), str(uuid.uuid4())]  # not canonical: kept as text, not re-cased
    assert list(MessageIds(shouting)) == shouting
    with pytest.raises(TypeError, match="strings"):
        MessageIds([7])


@pytest.mark.parametrize("make, width", [(_uuids, 16), (_object_ids, 32)])
def test_message_ids_cost_their_bytes_not_a_string_each(make, width):
    ids = make(2000)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        queue = MessageIds(iter(ids))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(queue) == 2000
    assert held < 1.3 * width * 2000, f"{held / 2000:.1f} B per id"  # a str each: 85 to 113 B


def test_node_set_uses_a_sorted_array_as_it_is_and_sorts_anything_else():
    ordered = array(NODE_ARRAY, [2, 5, 9])
    assert NodeSet(ordered).nodes is ordered
    listed = [2, 5, 9]  # a list of ints (Flower's get_node_ids) is not kept: 40 B per node
    assert NodeSet(listed).nodes is not listed and NodeSet(listed).nodes == ordered
    unordered = NodeSet({9, 2, 5, 2**64 - 1})
    assert isinstance(unordered.nodes, array) and list(unordered) == [2, 5, 9, 2**64 - 1]
    assert node_array([9, 2, 9, 5]) == ordered  # sorted and deduplicated
    assert 5 in unordered and 2**64 - 1 in unordered and len(unordered) == 4
    assert 3 not in unordered and 10 not in unordered and -1 not in unordered and "5" not in unordered
    assert 1 not in NodeSet([])


def test_site_diagnostics_give_the_means_the_dicts_gave():
    per_site = {7: {"loss": 0.1, "acc": 0.5}, 2**64 - 1: {"loss": 0.3}, 3: {}, 4: {"loss": 0.2, "new": 1.0},
                5: {"loss": math.nan, "acc": 0.7}}  # NaN: not sent
    diag = SiteDiagnostics(["loss", "acc"])
    for values in per_site.values():
        diag.add(values)
    assert len(diag) == 5
    for name in ("loss", "acc", "new"):
        values = [d[name] for d in per_site.values() if name in d and not math.isnan(d[name])]
        assert diag.mean(name) == sum(values) / len(values)  # same values, same order: the same float
    assert diag.mean("absent") is None and SiteDiagnostics(["loss"]).mean("loss") is None


def test_site_diagnostics_keep_nothing_per_site():
    diag = SiteDiagnostics(keys.DIAGNOSTICS)
    diag.add({keys.DIAG_LOSS: 0.5})
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            diag.add({keys.DIAG_LOSS: 0.5 + i, keys.DIAG_CLIPPED: 1.0})
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 2000, f"{held} B for 2,000 sites"  # columns: 80 KB; a dict each: ~500 KB
    assert diag.mean(keys.DIAG_LOSS) == sum([0.5] + [0.5 + i for i in range(2000)]) / 2001


def _columns(per_site: dict) -> dict:
    """The columns form checkpoints held before the running sums (node ids as int64 bits)."""
    names = sorted({name for values in per_site.values() for name in values})
    nodes = np.array(list(per_site), dtype=np.uint64).view(np.int64)
    return {"nodes": torch.from_numpy(nodes),
            "columns": {name: torch.tensor([v.get(name, math.nan) for v in per_site.values()], dtype=torch.float64)
                        for name in names}}


def test_site_diagnostics_survive_a_checkpoint_and_read_the_older_forms():
    per_site = {2**64 - 1: {keys.DIAG_LOSS: 0.25}, 5: {keys.DIAG_CLIPPED: 1.0, keys.DIAG_LOSS: 1 / 3}}
    diag = SiteDiagnostics(keys.DIAGNOSTICS)
    for values in per_site.values():
        diag.add(values)
    buf = io.BytesIO()
    torch.save(diag.to_state(), buf)
    buf.seek(0)
    assert SiteDiagnostics.from_state(torch.load(buf, weights_only=True)) == diag
    for older in (per_site, _columns(per_site)):  # a dict per site; columns
        back = SiteDiagnostics.from_state(older)
        assert len(back) == 2 and all(back.mean(n) == diag.mean(n) for n in keys.DIAGNOSTICS)
    broken = _columns(per_site)
    broken["columns"][keys.DIAG_LOSS] = broken["columns"][keys.DIAG_LOSS][:1]
    with pytest.raises(ValueError, match="one value per site"):
        SiteDiagnostics.from_state(broken)
    bad = diag.to_state()
    bad["counts"][keys.DIAG_LOSS] = 3  # more sites than the round had
    with pytest.raises(ValueError, match="sums and counts"):
        SiteDiagnostics.from_state(bad)


def dpagg_strategy(sites: int) -> DPAggTIStrategy:
    plan = DPAggPlan(noise_multiplier=0.0, sample_rate=1.0, releases=1, denominator=float(sites),
                     planned_epsilon_prv=0.0, planned_epsilon_rdp=0.0)
    return DPAggTIStrategy(plan=plan, mechanism=GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0),
                           noise=NoiseSource.seeded(0), ledger=PrivacyLedger(delta=1e-5), dim=4)


def round_peak(method: str, sites: int) -> int:
    """The traced peak (bytes) of one round with ``sites`` replying sites, after a warm-up round."""
    def one() -> int:
        if method == "lora":
            strategy, answer = lora_strategy(sites), lora_answer(SHAPES, 1.0)
        else:
            strategy, answer = dpagg_strategy(sites), dpagg_answer(4, 1.0)
        grid = ReplayGrid(sites, answer)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            result = strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=1, timeout=60.0)
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
        assert result.train_metrics_clientapp[1]["sites"] == sites
        return peak

    one()  # lazy imports and caches of the first round are not per site
    return one()


@pytest.mark.parametrize("method", ["lora", "dpagg"])
def test_the_server_holds_little_memory_per_site(method):
    """A round's bookkeeping per site (a packed message id while it is unanswered, who was asked
    and who took part, 8 B each, and the test grid's own) is about 90 to 100 bytes (measured with
    40 and 440 sites). A ``str`` per pending id brought DPAgg-TI's to about 160 B (its peak, at the
    push, holds every id), a dict of diagnostics per site adds about 250 B, the instruction
    messages built all at once about 1 KB: each of those fails the bound."""
    set_task_identity()
    small, large = 40, 440
    per_site = (round_peak(method, large) - round_peak(method, small)) / (large - small)
    assert per_site < 140, f"{method}: {per_site:.0f} bytes per site"
