"""Epsilon of a sequence of :class:`PrivacyEvent` and noise calibration for a target.

Accountants (Opacus 1.6):
- ``"prv"``: the privacy-random-variable accountant (Gopi, Lee, Wutschitz, "Numerical
  Composition of Differential Privacy", NeurIPS 2021). Tight; privadapt's headline epsilon.
  Opacus returns the upper end of its error interval (``eps_error`` wide).
- ``"rdp"``: Rényi DP of the sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019).
  Looser but simple; reported as the conservative cross-check.

Both model the Poisson-subsampled Gaussian mechanism under add/remove-one adjacency, which is
what privadapt's code does (Poisson sampling of images or sites, fixed public denominator).
``sample_rate = 1`` is the unsubsampled Gaussian mechanism. Any other sampling scheme or
adjacency is refused rather than mis-accounted.

The accountants run NumPy's BLAS with one thread. The ServerApp plans and accounts on a
worker thread (Flower's simulation engine, the SuperLink's ServerApp runner), and OpenBLAS'
threaded kernels called from such a thread can hang for good in ``exec_blas`` while its
pool waits (numpy/numpy#17752, OpenMathLib/OpenBLAS#1844): one such hang in ``np.dot``
inside Opacus' PRV discretisation stopped a whole test run. The vectors are small, so one
thread costs nothing measurable.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Literal

from opacus.accountants import PRVAccountant, RDPAccountant
from threadpoolctl import ThreadpoolController

from common.dp.mechanism import PrivacyEvent

AccountantName = Literal["prv", "rdp"]
PRV_EPS_ERROR = 0.01
_BLAS = ThreadpoolController()  # the BLAS libraries loaded in this process, found once


def _prv(history: list[tuple[float, float, int]], delta: float) -> float:
    acc = PRVAccountant()
    acc.history = history
    return float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))


def _rdp(history: list[tuple[float, float, int]], delta: float) -> float:
    acc = RDPAccountant()
    acc.history = history
    return float(acc.get_epsilon(delta=delta))


ACCOUNTANTS: dict[str, Callable[[list[tuple[float, float, int]], float], float]] = {
    "prv": _prv,
    "rdp": _rdp,
}


def epsilon(events: Iterable[PrivacyEvent], delta: float, accountant: AccountantName = "prv") -> float:
    """Epsilon at ``delta`` of the composition of ``events`` (inf if any carries no noise).

    Events of different units must not be mixed: filter by unit before calling.
    """
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {sorted(ACCOUNTANTS)}")
    events = list(events)
    if not events:
        return 0.0
    units = {e.unit for e in events}
    if len(units) > 1:
        raise ValueError(f"events of several privacy units cannot be composed together: {sorted(units)}")
    for e in events:
        if e.adjacency != "add-remove" or e.sampling not in ("poisson", "none"):
            raise ValueError(f"accountant {accountant!r} supports Poisson sampling under add/remove adjacency only, got {e}")
    if any(e.noise_multiplier == 0 for e in events):
        return math.inf
    # Events with the same (z, q) merge into one of their total steps: composition is
    # commutative, so the epsilon is the same, and the accountants are much faster on it.
    steps: dict[tuple[float, float], int] = {}
    for e in events:
        steps[(e.noise_multiplier, e.sample_rate)] = steps.get((e.noise_multiplier, e.sample_rate), 0) + e.steps
    history = [(z, q, k) for (z, q), k in steps.items()]
    with _BLAS.limit(limits=1, user_api="blas"):  # see the module docstring
        return ACCOUNTANTS[accountant](history, delta)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int = 1,
    *,
    unit: Literal["record", "site"] = "record",
    prior: Iterable[PrivacyEvent] = (),
    accountant: AccountantName = "prv",
    tolerance: float = 1e-3,
    max_noise_multiplier: float = 1e4,
) -> float:
    """Smallest noise multiplier z (to ``tolerance``) whose ``steps`` more releases at rate
    ``sample_rate``, composed after the ``prior`` events, stay within ``target_epsilon``.

    Returns 0.0 for an infinite target (no noise). Raises ``ValueError`` if the target
    cannot be met with z <= ``max_noise_multiplier`` (for instance when ``prior`` already
    spent it).
    """
    if math.isinf(target_epsilon):
        return 0.0
    if not (target_epsilon > 0):
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    prior = list(prior)

    def eps_at(z: float) -> float:
        new = PrivacyEvent.planned(z, sample_rate, steps, unit)
        return epsilon(prior + [new], delta, accountant)

    lo, hi = 0.0, 1.0
    while eps_at(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > max_noise_multiplier:
            raise ValueError(
                f"target epsilon {target_epsilon} at delta {delta} cannot be met with sample rate "
                f"{sample_rate} over {steps} step(s) (prior spend: {len(prior)} event(s)) "
                f"for any noise multiplier <= {max_noise_multiplier}"
            )
    while hi - lo > tolerance * max(1.0, hi):
        mid = (lo + hi) / 2
        if eps_at(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
