"""bench/native_passes.py: the compiled passes the aggregation benchmark times compute
what the server's NumPy path computes (the same float64 sum bit for bit; the norm to rounding),
and refuse arrays they cannot read. Skipped, with the reason, where no C compiler is installed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.native_passes import compile_passes
from common.dp.flatsum import flat_sum_of_squares

KERNELS, HOW = compile_passes()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason=f"native passes not built: {HOW}")


@needs_kernels
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 1000, 70_001])
def test_the_norm_is_the_float64_sum_of_squares(n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 3
    exact = math.fsum(float(v) * float(v) for v in x)  # each square is exact in float64
    got = KERNELS.sum_of_squares(x)
    assert got == pytest.approx(exact, rel=1e-13, abs=0.0)
    assert got == pytest.approx(flat_sum_of_squares([x]) if n else 0.0, rel=1e-13, abs=0.0)


@needs_kernels
@pytest.mark.parametrize("at", [57, 98])  # in the vectorised body, in the scalar tail
def test_a_non_finite_entry_makes_the_norm_non_finite(at):
    x = np.ones(100, dtype=np.float32)
    x[at] = np.nan
    assert math.isnan(KERNELS.sum_of_squares(x))
    x[at] = np.inf
    assert KERNELS.sum_of_squares(x) == math.inf


@needs_kernels
@pytest.mark.parametrize("factor", [1.0, 0.3])
def test_the_add_is_numpys_float64_add_bit_for_bit(factor):
    rng = np.random.default_rng(1)
    x, run = rng.standard_normal(10_000).astype(np.float32), rng.standard_normal(4096)
    expected = run.copy()
    for lo in range(0, x.size, run.size):  # run[:m] += float64(x[lo:lo + m]) * factor, run by run
        piece = x[lo:lo + run.size].astype(np.float64) * factor
        expected[:piece.size] += piece
    KERNELS.add_runs(run, x, factor)
    assert np.array_equal(run, expected)


@needs_kernels
def test_arrays_it_cannot_read_are_refused_by_name():
    with pytest.raises(ValueError, match="x must be a 1-D C-contiguous float32"):
        KERNELS.sum_of_squares(np.ones(4))
    with pytest.raises(ValueError, match="x must be a 1-D C-contiguous float32"):
        KERNELS.sum_of_squares(np.ones(8, dtype=np.float32)[::2])
    with pytest.raises(ValueError, match="run must be a 1-D C-contiguous float64"):
        KERNELS.add_runs(np.ones(4, dtype=np.float32), np.ones(4, dtype=np.float32))
