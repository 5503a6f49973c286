"""Tests of common/dp/kernels.py: the compiled loops behind the server's norm and blocked sum.

The add must be the float64 arithmetic of adding records one by one, bit for bit; the sum of
squares must be the float64 sum of exact squares to rounding, the same bits for the same values
whatever array flags they come with, and non-finite iff an entry is.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.dp import kernels


def _bits(x: np.ndarray) -> np.ndarray:
    """float64 bit patterns: equality here tells -0.0 from 0.0."""
    return np.ascontiguousarray(x, dtype=np.float64).view(np.int64)


def _one_by_one(start: np.ndarray | None, records: list[np.ndarray], factors: list[float]) -> np.ndarray:
    """The reference: float64(record) * factor added one record after another, in NumPy."""
    total = None if start is None else start.copy()
    for record, factor in zip(records, factors):
        term = record.astype(np.float64) * factor
        total = term if total is None else total + term
    return total


def _records(n: int, count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) * np.float32(10.0 ** rng.integers(-6, 3)) for _ in range(count)]


# ---- add_block ------------------------------------------------------------------------
@pytest.mark.parametrize("count", [1, 2, 3, 8])
@pytest.mark.parametrize("fresh", [True, False])
def test_a_block_adds_as_one_record_after_another_bit_for_bit(count: int, fresh: bool) -> None:
    records = _records(1003, count)
    factors = [1.0, 0.37, 1.0, 0.9999999, 0.5, 1.0, 1e-3, 0.25][:count]
    start = np.random.default_rng(9).standard_normal(1003)
    out = np.full(1003, np.nan) if fresh else start.copy()  # fresh: whatever out held is never read
    for record in records:
        record.flags.writeable = False  # as a reply's view
    kernels.add_block(out, records, factors, fresh=fresh)
    assert np.array_equal(_bits(out), _bits(_one_by_one(None if fresh else start, records, factors)))


def test_a_fresh_sum_keeps_the_sign_of_zero() -> None:
    """0.0 + (-0.0) is 0.0: a fresh sum must start from the first record, not from zero."""
    record = np.array([-0.0, 0.0, -1.0], dtype=np.float32)
    out = np.ones(3)
    kernels.add_block(out, [record], [1.0], fresh=True)
    assert np.array_equal(_bits(out), _bits(np.array([-0.0, 0.0, -1.0])))


def test_records_of_mixed_dtypes_are_widened_exactly() -> None:
    a, b = _records(50, 2, seed=1)
    out = np.zeros(50)
    kernels.add_block(out, [a, b.astype(np.float64), a.astype(np.float16)], [1.0, 0.5, 2.0], fresh=False)
    reference = _one_by_one(np.zeros(50), [a, b, a.astype(np.float16)], [1.0, 0.5, 2.0])
    assert np.array_equal(_bits(out), _bits(reference))


def test_non_finite_entries_go_through_the_add_as_ieee_says() -> None:
    out = np.zeros(3)
    kernels.add_block(out, [np.array([np.inf, np.nan, 1.0], dtype=np.float32)], [1.0], fresh=False)
    assert out[0] == math.inf and math.isnan(out[1]) and out[2] == 1.0


@pytest.mark.parametrize("call, match", [
    (lambda: kernels.add_block(np.zeros(3), [np.zeros(4, np.float32)], [1.0], fresh=False), "entries"),
    (lambda: kernels.add_block(np.zeros(3), [np.zeros(3, np.float32)], [1.0, 1.0], fresh=False), "factors"),
    (lambda: kernels.add_block(np.zeros(3), [], [], fresh=False), "at least one"),
    (lambda: kernels.add_block(np.zeros(3, np.float32), [np.zeros(3, np.float32)], [1.0], fresh=False), "float64"),
    (lambda: kernels.add_block(np.zeros(6)[::2], [np.zeros(3, np.float32)], [1.0], fresh=False), "contiguous"),
    (lambda: kernels.add_block(np.zeros(3), [np.zeros(3, np.int32)], [1.0], fresh=False), "floating-point"),
    (lambda: kernels.add_block(np.zeros(3), [np.zeros((3, 1), np.float32)], [1.0], fresh=False), "1-D"),
])
def test_bad_arguments_are_refused_by_name(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_a_refused_block_leaves_the_sum_untouched() -> None:
    out = np.arange(4.0)
    with pytest.raises(ValueError):
        kernels.add_block(out, [np.ones(4, np.float32), np.ones(5, np.float32)], [1.0, 1.0], fresh=False)
    assert np.array_equal(out, np.arange(4.0))


# ---- run_squares ----------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-2.0 ** 60, 2.0 ** 60, width=32), max_size=300), run=st.integers(1, 64))
def test_the_sum_of_squares_is_the_float64_sum_of_exact_squares(values: list[float], run: int) -> None:
    x = np.array(values, dtype=np.float32)
    squares = x.astype(np.float64) ** 2  # exact: a float32's square fits a float64's mantissa
    got = kernels.run_squares(x, run)
    assert got == pytest.approx(math.fsum(squares), rel=1e-13, abs=0.0)


def test_runs_are_added_left_to_right() -> None:
    """The result is the left-to-right float64 sum of each run's own sum of squares."""
    x = _records(10_001, 1, seed=3)[0]
    run = 1000
    parts = [kernels.run_squares(x[lo:lo + run], run) for lo in range(0, x.size, run)]
    total = 0.0
    for part in parts:
        total += part
    assert kernels.run_squares(x, run) == total


def test_the_same_values_give_the_same_bits_whatever_their_flags() -> None:
    """Writable or read-only, contiguous or a strided view, float16 or its float32 widening:
    one compiled loop per dtype, so one result."""
    x = _records(70_000, 1, seed=4)[0]
    readonly = x.copy()
    readonly.flags.writeable = False
    strided = np.repeat(x, 2)[::2]
    expected = kernels.run_squares(x, 1 << 16)
    assert kernels.run_squares(readonly, 1 << 16) == expected
    assert kernels.run_squares(strided, 1 << 16) == expected
    assert kernels.run_squares(x.astype(">f4"), 1 << 16) == expected  # other byte order: converted exactly
    half = x.astype(np.float16)
    assert kernels.run_squares(half, 1 << 16) == kernels.run_squares(half.astype(np.float32), 1 << 16)


@pytest.mark.parametrize("bad, expected", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "inf")])
@pytest.mark.parametrize("where", [0, 37, 69_999])  # the vector body and the tail of a run
def test_the_sum_of_squares_is_not_finite_iff_an_entry_is(bad: float, expected: str, where: int) -> None:
    x = np.ones(70_000, dtype=np.float32)
    x[where] = bad
    got = kernels.run_squares(x, 1 << 16)
    assert (math.isnan(got) if expected == "nan" else got == math.inf)
    assert kernels.run_squares(np.full(5, 3.4e38, dtype=np.float32), 2) == pytest.approx(5 * 3.4e38 ** 2, rel=1e-6)


def test_run_squares_refuses_what_it_cannot_take() -> None:
    assert kernels.run_squares(np.zeros(0, np.float32), 8) == 0.0
    with pytest.raises(ValueError, match="run must be"):
        kernels.run_squares(np.zeros(3, np.float32), 0)
    with pytest.raises(ValueError, match="floating-point"):
        kernels.run_squares(np.zeros(3, np.int64), 8)
