"""Fused float32 -> float64 loops for the exact clipped sum, compiled by numba.

The server's sum of checked replies makes two passes over every reply
(:mod:`common.dp.flatsum`): its float64 sum of squares (the norm, which also tells whether every
entry is finite, and fixes the clip factor), then its float64 addition into the running sum.
NumPy has no fused loop for either (a float32 array squared and accumulated in float64; a
float32 array added into a float64 one), so it stages a float64 copy, and the cast costs more
than the memory traffic; these loops read each float32 entry once (figures: BENCHMARKS.md).

Both loops are compiled on first use (numba, cached on disk next to this file) for the arrays'
dtypes and layouts. Their arithmetic:

- :func:`run_squares` adds ``float64(x[i])**2`` (exact for float16/float32 entries) in runs
  of ``run`` entries. Within a run the squares are added in the order the vectoriser chooses
  (``fastmath={"reassoc"}`` on that one loop, nothing else relaxed): deterministic for a given
  build and machine, but not necessarily left to right, so the last bits of a norm may differ
  between machines, as they did with BLAS ``dot`` (whose kernels are also chosen per CPU). The
  runs' partial sums are added strictly left to right, so a record's norm depends only on its
  entries in order and their dtype, not on how they are split into tensors (see
  :func:`common.dp.flatsum.flat_sum_of_squares`). Squares of float32-range values cannot
  overflow float64, so the result is finite iff every entry is.
- :func:`add_block` is element-wise, with no relaxed maths and no fused multiply-add: each
  record of a block in turn, ``acc + float64(x[i]) * factor``, the product rounded once
  (multiplying by a factor of 1 is exact) and the sum once, exactly the float64 operations
  :meth:`common.dp.mechanism.GaussianSumMechanism.bound_tree` and ``add`` perform, bit for bit.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numba import njit


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def _squares(x):  # pragma: no cover - compiled
    s = 0.0
    for i in range(x.size):  # (indices from 0 to size: numba then vectorises; a range(lo, hi) it did not)
        v = np.float64(x[i])
        s += v * v
    return s


@njit(nogil=True, cache=True)
def _run_squares(x, run):  # pragma: no cover - compiled
    total = 0.0  # strict IEEE order across runs: no fastmath flag on this function
    for lo in range(0, x.size, run):
        total += _squares(x[lo:lo + run])
    return total


@njit(nogil=True, cache=True)
def _add_block(out, xs, factors, fresh):  # pragma: no cover - compiled
    # xs: a tuple of same-typed arrays (its length is part of the type: one compiled loop per
    # block size, whose inner loop over the records the compiler unrolls)
    if fresh:  # the first record starts the sum: out is written, never read
        for i in range(out.size):
            acc = np.float64(xs[0][i]) * factors[0]
            for j in range(1, len(xs)):
                acc += np.float64(xs[j][i]) * factors[j]
            out[i] = acc
    else:
        for i in range(out.size):
            acc = out[i]
            for j in range(len(xs)):
                acc += np.float64(xs[j][i]) * factors[j]
            out[i] = acc


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_COMPILED = (_F32, _F64)


def kernel_input(x: np.ndarray) -> np.ndarray:
    """``x`` as the loops take it: a READ-ONLY, C-contiguous, 1-D native float32 or float64 array
    (a view when ``x`` is one already). Other floating types are converted first: float16 to
    float32 (exact), non-native byte order to native (exact), longer floats to float64 (rounded,
    as NumPy's own float64 arithmetic would); a non-float dtype is refused by name. One array
    type per dtype means one compiled loop per dtype, so the same values always meet the same
    machine code."""
    flags = x.flags
    if not flags.writeable and flags.c_contiguous and x.ndim == 1 and (x.dtype is _F32 or x.dtype is _F64):
        return x  # as the loops take it already (a reply's view): nothing to check further
    if x.ndim != 1:
        raise ValueError(f"the fused loops take 1-D arrays, got shape {x.shape}")
    if x.dtype.kind != "f":
        raise ValueError(f"the fused loops take floating-point arrays, got {x.dtype}")
    if x.dtype not in _COMPILED:
        x = x.astype(np.float32 if x.dtype.itemsize <= 4 else np.float64)
    if x.flags.writeable or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x).view()
        x.flags.writeable = False
    return x


def run_squares(x: np.ndarray, run: int) -> float:
    """sum(float64(x)^2) over the 1-D array ``x``, its runs of ``run`` entries added left to right."""
    if run < 1:
        raise ValueError(f"run must be >= 1, got {run}")
    return float(_run_squares(kernel_input(x), run))


def add_block(out: np.ndarray, records: Sequence[np.ndarray], factors: Sequence[float], *, fresh: bool) -> None:
    """``out += float64(record) * factor`` for each record in turn, in place, element by
    element: each entry of ``out`` is read once, the records' entries are added to it in record
    order (each product and each sum rounded once: bit for bit the one-by-one adds), and it is
    written once. So the float64 sum costs 16 bytes per entry per BLOCK, not per record.
    ``fresh``: the first record STARTS the sum (``out`` is overwritten, not read)."""
    if not records or len(records) != len(factors):
        raise ValueError(f"{len(records)} records for {len(factors)} factors (need at least one)")
    if out.dtype != np.float64 or out.ndim != 1 or not out.flags.writeable or not out.flags.c_contiguous:
        raise ValueError("out must be a writeable, C-contiguous 1-D float64 array")
    inputs = tuple(kernel_input(record) for record in records)
    dtype = inputs[0].dtype
    if any(x.dtype != dtype for x in inputs):  # one compiled type per tuple: widen all (exact for float32)
        inputs = tuple(kernel_input(x.astype(np.float64)) for x in inputs)
    if any(x.size != out.size for x in inputs):
        raise ValueError(f"records of {sorted({x.size for x in inputs})} entries for a sum of {out.size}")
    _add_block(out, inputs, np.array(factors, dtype=np.float64), bool(fresh))
