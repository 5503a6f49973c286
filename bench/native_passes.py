"""C versions of the two passes an exact clipped sum makes, for the benchmark only.

:func:`bench.aggregation.passes` asks how close to a memory copy the server's sum
of checked replies could get. NumPy has no fused kernel for either pass (float32 squares
accumulated in float64; float32 added into a float64 sum), so it stages a float64 copy; the
server uses fused loops compiled by numba (:mod:`common.dp.kernels`). These two C loops are a
second compiler's figure for the same passes: vectorised by gcc (AVX-512 / AVX2 / baseline
clones on x86-64, chosen at load time), no FMA contraction (``-ffp-contract=off``: a scaled
record is ``float64(x) * f`` rounded, then added, as the mechanism does). They are compiled
into a temporary directory when a C compiler is on PATH and are used by nothing but the
benchmark.
"""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

_SOURCE = r"""
#include <stddef.h>
#if defined(__x86_64__) && defined(__GNUC__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif
#define LANES 16

/* sum of float64(x[i])^2: every square is exact, LANES independent float64 accumulators */
CLONES double pa_sum_of_squares(const float *x, size_t n) {
    double acc[LANES] = {0};
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int k = 0; k < LANES; k++) { double v = x[i + k]; acc[k] += v * v; }
    double tail = 0.0, s = 0.0;
    for (; i < n; i++) { double v = x[i]; tail += v * v; }
    for (int k = 0; k < LANES; k++) s += acc[k];
    return s + tail;
}

/* run[j] += float64(x[lo + j]) * f for each run of `chunk` entries of x, into one
   cache-resident float64 run (the blocked sum's inner loop with the sum's traffic left out) */
CLONES void pa_add_runs(double *run, const float *x, size_t n, size_t chunk, double f) {
    for (size_t lo = 0; lo < n; lo += chunk) {
        size_t m = n - lo < chunk ? n - lo : chunk;
        const float *p = x + lo;
        if (f == 1.0) for (size_t j = 0; j < m; j++) run[j] += (double)p[j];
        else for (size_t j = 0; j < m; j++) run[j] += (double)p[j] * f;
    }
}
"""


class NativePasses:
    """The compiled loops, on float32 / float64 NumPy arrays (C-contiguous)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._lib = library
        library.pa_sum_of_squares.restype = ctypes.c_double
        library.pa_sum_of_squares.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        library.pa_add_runs.restype = None
        library.pa_add_runs.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                                        ctypes.c_double]

    def sum_of_squares(self, x: np.ndarray) -> float:
        _check(x, np.float32, "x")
        return self._lib.pa_sum_of_squares(x.ctypes.data, x.size)

    def add_runs(self, run: np.ndarray, x: np.ndarray, factor: float = 1.0) -> None:
        """``run[:m] += float64(x[lo:lo + m]) * factor`` for every run ``lo`` of ``run.size`` entries."""
        _check(x, np.float32, "x")
        _check(run, np.float64, "run")
        if not run.flags.writeable or run.size == 0:
            raise ValueError("run must be a writeable, non-empty float64 array")
        self._lib.pa_add_runs(run.ctypes.data, x.ctypes.data, x.size, run.size, float(factor))


def _check(array: np.ndarray, dtype, name: str) -> None:
    if array.dtype != dtype or array.ndim != 1 or not array.flags.c_contiguous:
        raise ValueError(f"{name} must be a 1-D C-contiguous {np.dtype(dtype).name} array, got "
                         f"{array.dtype} with shape {array.shape}")


def compile_passes() -> tuple[NativePasses | None, str]:
    """The compiled loops and how they were built, or None and why not (no compiler, or it failed)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler on PATH"
    flags = ["-O3", "-ffp-contract=off", "-fPIC", "-shared"]
    with tempfile.TemporaryDirectory(prefix="privadapt-passes-") as build:
        source, library = Path(build) / "passes.c", Path(build) / "passes.so"
        source.write_text(_SOURCE)
        done = subprocess.run([compiler, *flags, "-o", str(library), str(source)], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            return None, f"{compiler} failed: {done.stderr.strip()[-300:]}"
        loaded = ctypes.CDLL(str(library))  # mapped now: the file may go with the directory
    return NativePasses(loaded), f"{Path(compiler).name} {' '.join(flags)} on {platform.machine()}"
