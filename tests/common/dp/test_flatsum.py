"""Tests of common/dp/flatsum.py: the blocked float64 sum behind
GaussianSumMechanism.add_bounded_block / add_block, and the runs it walks.

Every block, whatever its size, the form of its records or the run and stage settings, must
give the float64 sum of adding its records one by one (add(total, bound_tree(r))), bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.dp import flatsum
from common.dp.flatsum import FlatRecord, chunk_pieces, chunk_plan
from common.dp.mechanism import GaussianSumMechanism


# ---- blocked sums (the server's hot path) ---------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    """The float64 tensor's bit patterns: equality here is bit for bit (it tells -0.0 from 0.0)."""
    return t.contiguous().view(torch.int64)


def _records(scales: list[float], shapes: dict, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """float32 records of flat norm ``scale`` each (C = 1: scale > 1 is clipped)."""
    rng = np.random.default_rng(seed)
    out = []
    for scale in scales:
        rec = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        norm = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in rec.values()))
        out.append({k: (v * np.float32(scale / norm)).astype(np.float32) for k, v in rec.items()})
    return out


def _reference(m: GaussianSumMechanism, records: list) -> dict[str, torch.Tensor]:
    """``add(total, bound_tree(record))`` one record after another: the arithmetic a block must give."""
    total = None
    for rec in records:
        total = m.add(total, m.bound_tree({k: torch.as_tensor(v) for k, v in rec.items()}))
    return total


# many small tensors, an empty one, and one that spans several runs when runs are short
BLOCK_SHAPES = {"a": (3, 5), "b": (7,), "empty": (0, 4), "c": (40, 30), "d": (2, 2, 2)}


@pytest.mark.parametrize("run", [16, 100, 1 << 16])  # the norm's run boundaries inside tensors, across them, none
@pytest.mark.parametrize("blocks", [[1, 1, 1, 1, 1], [5], [2, 3], [1, 4]])
@pytest.mark.parametrize("scales", [[0.5, 3.0, 0.999, 1.0 + 1e-7, 7.0], [7.0, 0.5, 1.0, 2.0, 0.1]])
def test_blocks_give_the_one_by_one_sum_bit_for_bit(monkeypatch, run: int, blocks: list[int],
                                                    scales: list[float]) -> None:
    """Blocks of any size, clipped and unclipped records mixed (the first one too), equal
    add(total, bound_tree(r)) record by record: every entry sees the same float64 additions
    in the same order."""
    monkeypatch.setattr(flatsum, "_SQUARES_CHUNK", run)
    chunk_plan.cache_clear()
    m = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0)
    records = _records(scales, BLOCK_SHAPES)
    total, start = None, 0
    for size in blocks:
        block = records[start:start + size]
        total = m.add_bounded_block(total, block, [float(m.tree_norm(r)) for r in block])
        start += size
    reference = _reference(m, records)
    assert list(total) == list(reference)
    for k in reference:
        assert total[k].dtype == torch.float64 and total[k].shape == reference[k].shape
        assert torch.equal(_bits(total[k]), _bits(reference[k])), k
    chunk_plan.cache_clear()


def test_a_block_is_the_same_whatever_form_its_records_take() -> None:
    """NumPy arrays, CPU tensors and FlatRecords (read_update's form) of the same values, in
    one block, with the norms given or computed: the same sum."""
    m = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0)
    records = _records([0.5, 2.0, 0.25], BLOCK_SHAPES, seed=1)
    flat = FlatRecord(list(BLOCK_SHAPES), list(BLOCK_SHAPES.values()), [v.reshape(-1) for v in records[2].values()])
    mixed = [records[0], {k: torch.from_numpy(v) for k, v in records[1].items()}, flat]
    total = m.add_bounded_block(None, mixed)
    reference = _reference(m, records)
    for k in reference:
        assert torch.equal(_bits(total[k]), _bits(reference[k]))
    assert float(m.tree_norm(flat)) == float(m.tree_norm(records[2]))


def test_add_block_of_site_sums_is_add_one_after_another() -> None:
    parts = _records([5.0, 0.1, 30.0], BLOCK_SHAPES, seed=2)  # site sums: never bounded
    total = GaussianSumMechanism.add_block(None, parts[:2])
    total = GaussianSumMechanism.add_block(total, parts[2:])
    reference = None
    for part in parts:
        reference = GaussianSumMechanism.add(reference, {k: torch.from_numpy(v) for k, v in part.items()})
    for k in reference:
        assert torch.equal(_bits(total[k]), _bits(reference[k]))


def test_a_sum_started_over_an_old_buffer_is_the_fresh_sum() -> None:
    """``out``: the last round's sum is written over, never read (first block: the first record
    starts the sum), so the result is the fresh one bit for bit; a buffer of another layout is
    not used."""
    m = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0)
    old = m.add_bounded_block(None, _records([0.5, 9.0], BLOCK_SHAPES, seed=5))
    old.flat[:] = np.nan  # whatever it held
    records = _records([0.5, 3.0, 1.0], BLOCK_SHAPES, seed=6)
    total = m.add_bounded_block(None, records[:2], out=old)
    total = m.add_bounded_block(total, records[2:])
    assert total is old
    reference = _reference(m, records)
    for k in reference:
        assert torch.equal(_bits(total[k]), _bits(reference[k])), k
    other = m.add_bounded_block(None, _records([0.5], {"z": (3,)}))
    assert m.add_block(None, records[:1], out=other) is not other  # another layout: a new buffer


@pytest.mark.parametrize("bad,match", [({"a": np.zeros((5, 3), np.float32)}, "shape"), ({}, "keys")])
def test_a_block_with_a_misfit_record_leaves_the_total_untouched(bad: dict, match: str) -> None:
    """Every record of a block is checked before anything is added."""
    m = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0)
    records = _records([0.5, 0.5, 0.5], BLOCK_SHAPES, seed=3)
    total = m.add_bounded_block(None, records[:1])
    before = {k: v.clone() for k, v in total.items()}
    misfit = {**records[2], **bad} if bad else {k: v for k, v in records[2].items() if k != "b"}
    with pytest.raises(ValueError, match=match):
        m.add_bounded_block(total, [records[1], misfit])
    for k in before:
        assert torch.equal(_bits(total[k]), _bits(before[k]))


def test_blocks_fall_back_to_torch_for_records_numpy_lacks() -> None:
    """A bfloat16 record (or a GPU one) in a block: one record at a time through torch, same sum."""
    m = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0)
    records = [{"a": torch.full((4,), v, dtype=torch.bfloat16), "b": torch.full((2, 2), -v, dtype=torch.bfloat16)}
               for v in (0.25, 2.0, 0.125)]
    total = m.add_bounded_block(None, records[:1])
    total = m.add_bounded_block(total, [{k: v.float().numpy() for k, v in records[1].items()}, records[2]])
    reference = _reference(m, [records[0], {k: v.float() for k, v in records[1].items()}, records[2]])
    for k in reference:
        assert torch.equal(total[k], reference[k])


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=8), chunk=st.integers(1, 50))
def test_chunk_plan_cuts_the_concatenation_into_runs(sizes: list[int], chunk: int) -> None:
    flats = [np.arange(n, dtype=np.float32) + 1000 * i for i, n in enumerate(sizes)]
    whole = np.concatenate(flats)
    plan = chunk_plan(tuple(sizes), chunk)
    assert [e[0] for e in plan] == list(range(0, whole.size, chunk))
    for entry in plan:
        assert np.array_equal(np.concatenate(chunk_pieces(flats, entry)), whole[entry[0]:entry[1]])
