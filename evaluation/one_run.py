"""The one-run epsilon lower bound of Steinke, Nasr and Jagielski, "Privacy Auditing with One
(1) Training Run" (NeurIPS 2023).

m canaries are each included independently with probability 1/2; the auditor scores every
canary against the release and guesses "in" or "out" for r of them (abstaining on the rest);
v guesses are right. For an (eps, delta)-DP mechanism their main theorem (Thm. 3.1 / Prop.
5.2) bounds the chance of at least v right guesses by

    P[W >= v] <= P[Binomial(r, p) >= v] + 2 m delta * alpha,   p = e^eps / (1 + e^eps),
    alpha = max over i in 1..v of P[v - i <= Binomial(r, p) < v] / i.

So if that p-value is below beta, the mechanism is not (eps, delta)-DP, at confidence 1 - beta;
the lower bound is the largest such eps (the p-value grows with eps: found by bisection).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def _check(m: int, r: int, v: int) -> None:
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses right] for an (eps, delta)-DP mechanism, bounded as above."""
    _check(m, r, v)
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need eps >= 0 and delta in [0, 1], got {eps}, {delta}")
    p = 1.0 / (1.0 + math.exp(-eps))
    tail = float(stats.binom.sf(v - 1, r, p))
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    # P[v - i <= B < v] for i = 1..v, divided by i; its maximum is alpha
    window = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, p))
    alpha = float(np.max(window / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, confidence: float = 0.95,
                        tolerance: float = 1e-4) -> float:
    """The largest eps that ``v`` right guesses out of ``r`` (of ``m`` canaries) reject at
    ``confidence`` (0 if none is rejected)."""
    _check(m, r, v)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1 - confidence
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return math.inf  # cannot happen for r >= 1: p -> 1 as eps grows
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < beta else (lo, mid)
    return lo
