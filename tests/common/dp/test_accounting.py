"""Tests of common/dp/accounting.py against reference values from three accountants.

tests/data/accountant_values.csv (a copy of shared/reference/accountant_values.csv, see
tests/data/README.md) holds Opacus RDP, Opacus PRV (eps_error 0.01) and dp-accounting PLD
epsilons of the Poisson-subsampled Gaussian mechanism.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from common.dp.accounting import ACCOUNTANTS, calibrate_noise_multiplier, epsilon
from common.dp.mechanism import PrivacyEvent

# Opacus warns on q = 1 (log(1 - q)) and when RDP's best order is its largest alpha.
pytestmark = [
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning"),
]

CSV = Path(__file__).resolve().parents[2] / "data" / "accountant_values.csv"


def _rows() -> list[dict[str, float]]:
    with CSV.open(newline="") as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    assert rows, f"no rows in {CSV}"
    return rows


ROWS = _rows()


def row_id(r: dict[str, float]) -> str:
    return f"q={r['sample_rate']:g}-z={r['noise_multiplier']:g}-T={int(r['steps'])}"


def event(z: float, q: float, steps: int = 1, unit: str = "record") -> PrivacyEvent:
    return PrivacyEvent(noise_multiplier=z, sample_rate=q, steps=steps, unit=unit,  # type: ignore[arg-type]
                        sampling="none" if q == 1.0 else "poisson")


def row_event(r: dict[str, float]) -> PrivacyEvent:
    return event(r["noise_multiplier"], r["sample_rate"], int(r["steps"]))


def test_reference_file_is_sane() -> None:
    assert len(ROWS) >= 10
    assert set(ROWS[0]) == {"sample_rate", "noise_multiplier", "steps", "delta",
                            "eps_opacus_rdp", "eps_opacus_prv", "eps_dp_accounting_pld"}


@pytest.mark.parametrize("r", ROWS, ids=row_id)
def test_against_reference(r: dict[str, float]) -> None:
    rdp = epsilon([row_event(r)], r["delta"], "rdp")
    prv = epsilon([row_event(r)], r["delta"], "prv")
    assert rdp == pytest.approx(r["eps_opacus_rdp"], rel=1e-3)
    assert prv == pytest.approx(r["eps_opacus_prv"], abs=0.02)  # PRV eps_error is 0.01
    pld = r["eps_dp_accounting_pld"]  # an independent, tight accountant
    assert prv >= pld - 0.02
    assert rdp >= pld


def test_default_accountant_is_prv() -> None:
    r = ROWS[0]
    assert epsilon([row_event(r)], r["delta"]) == epsilon([row_event(r)], r["delta"], "prv")


@pytest.mark.parametrize("accountant", sorted(ACCOUNTANTS))
def test_composition_of_events_equals_one_longer_event(accountant: str) -> None:
    split = epsilon([event(1.0, 0.05, 50), event(1.0, 0.05, 50)], 1e-5, accountant)  # type: ignore[arg-type]
    whole = epsilon([event(1.0, 0.05, 100)], 1e-5, accountant)  # type: ignore[arg-type]
    assert split == pytest.approx(whole, rel=1e-6)


@pytest.mark.parametrize("accountant", sorted(ACCOUNTANTS))
def test_gaussian_composition_matches_smaller_noise(accountant: str) -> None:
    # Two unsampled Gaussian releases at z compose to one at z / sqrt(2).
    two = epsilon([event(2.0, 1.0)] * 2, 1e-5, accountant)  # type: ignore[arg-type]
    one = epsilon([event(math.sqrt(2.0), 1.0)], 1e-5, accountant)  # type: ignore[arg-type]
    assert two == pytest.approx(one, abs=0.02)


@pytest.mark.parametrize("accountant", sorted(ACCOUNTANTS))
def test_more_noise_or_fewer_steps_means_less_epsilon(accountant: str) -> None:
    eps = lambda z, q, t: epsilon([event(z, q, t)], 1e-5, accountant)  # type: ignore[arg-type]  # noqa: E731
    assert eps(2.0, 0.01, 100) < eps(1.0, 0.01, 100) < eps(1.0, 0.01, 200) < eps(1.0, 0.02, 200)


@pytest.mark.parametrize("accountant", sorted(ACCOUNTANTS))
def test_no_noise_is_infinite(accountant: str) -> None:
    assert epsilon([event(0.0, 0.1, 10)], 1e-5, accountant) == math.inf  # type: ignore[arg-type]
    assert epsilon([event(1.0, 0.1), event(0.0, 1.0)], 1e-5, accountant) == math.inf  # type: ignore[arg-type]


def test_no_events_is_zero() -> None:
    assert epsilon([], 1e-5) == 0.0


def test_mixed_units_raise() -> None:
    with pytest.raises(ValueError, match="units"):
        epsilon([event(1.0, 0.1, unit="record"), event(1.0, 0.1, unit="site")], 1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        PrivacyEvent(noise_multiplier=1.0, sample_rate=0.1, sampling="fixed-size"),  # type: ignore[arg-type]
        PrivacyEvent(noise_multiplier=1.0, sample_rate=0.1, adjacency="replace-one"),  # type: ignore[arg-type]
    ],
    ids=["fixed-size-sampling", "replace-one"],
)
def test_unsupported_sampling_or_adjacency_raises(bad: PrivacyEvent) -> None:
    with pytest.raises(ValueError, match="Poisson sampling under add/remove"):
        epsilon([bad], 1e-5)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, math.nan])
def test_bad_delta_raises(delta: float) -> None:
    with pytest.raises(ValueError, match="delta"):
        epsilon([event(1.0, 0.1)], delta)


def test_unknown_accountant_raises() -> None:
    with pytest.raises(ValueError, match="unknown accountant"):
        epsilon([event(1.0, 0.1)], 1e-5, "gdp")  # type: ignore[arg-type]


# ---- calibration ------------------------------------------------------------------------
# Rows chosen to keep the PRV bisection fast (about 0.5-2 s each).
CALIBRATION_ROWS = [r for r in ROWS if (r["sample_rate"], r["noise_multiplier"], r["steps"])
                    in {(1.0, 4.0, 1), (0.01, 2.0, 100), (0.01, 2.0, 1000), (0.1, 2.0, 1)}]


def _check_calibration(r: dict[str, float], accountant: str, target: float) -> None:
    q, steps, delta = r["sample_rate"], int(r["steps"]), r["delta"]
    z = calibrate_noise_multiplier(target, delta, q, steps, accountant=accountant)  # type: ignore[arg-type]
    assert z == pytest.approx(r["noise_multiplier"], rel=0.03)
    assert epsilon([event(z, q, steps)], delta, accountant) <= target  # type: ignore[arg-type]
    # Smallest to tolerance (1e-3 relative, or absolute below 1): a bit less noise overspends.
    smaller = z - 1e-3 * max(1.0, z)
    assert epsilon([event(smaller, q, steps)], delta, accountant) > target  # type: ignore[arg-type]


def test_calibration_rows_found() -> None:
    assert len(CALIBRATION_ROWS) == 4


@pytest.mark.parametrize("r", CALIBRATION_ROWS, ids=row_id)
def test_calibrate_prv_recovers_noise_multiplier(r: dict[str, float]) -> None:
    _check_calibration(r, "prv", r["eps_opacus_prv"])


@pytest.mark.parametrize("r", CALIBRATION_ROWS[:3], ids=row_id)
def test_calibrate_rdp_recovers_noise_multiplier(r: dict[str, float]) -> None:
    _check_calibration(r, "rdp", r["eps_opacus_rdp"])


@pytest.mark.parametrize("accountant", sorted(ACCOUNTANTS))
def test_calibrate_after_prior_events(accountant: str) -> None:
    # Budget of one release at z = sqrt(2); a prior release at z = 2 leaves room for one more at z = 2.
    target = epsilon([event(math.sqrt(2.0), 1.0)], 1e-5, accountant)  # type: ignore[arg-type]
    z = calibrate_noise_multiplier(target, 1e-5, 1.0, prior=[event(2.0, 1.0)], accountant=accountant)  # type: ignore[arg-type]
    assert z == pytest.approx(2.0, rel=0.02)
    assert epsilon([event(2.0, 1.0), event(z, 1.0)], 1e-5, accountant) <= target  # type: ignore[arg-type]


def test_calibrate_infinite_target_is_no_noise() -> None:
    assert calibrate_noise_multiplier(math.inf, 1e-5, 0.1, 100) == 0.0


@pytest.mark.parametrize("target", [0.0, -1.0, math.nan])
def test_calibrate_bad_target_raises(target: float) -> None:
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise_multiplier(target, 1e-5, 0.1, 100)


@pytest.mark.parametrize("accountant", sorted(ACCOUNTANTS))
def test_calibrate_impossible_target_raises(accountant: str) -> None:
    prior = [event(0.5, 1.0)]  # already spends far more than 1.0
    assert epsilon(prior, 1e-5, accountant) > 1.0  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot be met") as info:
        calibrate_noise_multiplier(1.0, 1e-5, 1.0, prior=prior, accountant=accountant,  # type: ignore[arg-type]
                                   max_noise_multiplier=100.0)
    assert "prior" in str(info.value) and "100" in str(info.value)


def test_calibrate_prior_of_another_unit_raises() -> None:
    with pytest.raises(ValueError, match="units"):
        calibrate_noise_multiplier(5.0, 1e-5, 1.0, unit="record", prior=[event(2.0, 1.0, unit="site")], accountant="rdp")


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_the_accountants_run_blas_with_one_thread_and_give_the_threads_back(monkeypatch, accountant):
    # OpenBLAS' threaded kernels can hang for good when called from a worker thread, where the
    # ServerApp accounts (common/dp/accounting.py); a single-threaded BLAS never enters that path
    from threadpoolctl import threadpool_info

    import common.dp.accounting as accounting

    def blas_threads():
        return sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})

    before = blas_threads()
    seen = []
    real = accounting.ACCOUNTANTS[accountant]
    monkeypatch.setitem(accounting.ACCOUNTANTS, accountant, lambda h, d: (seen.append(blas_threads()), real(h, d))[1])
    eps = epsilon([PrivacyEvent(noise_multiplier=1.0, sample_rate=0.01, steps=100)], 1e-5, accountant)
    assert math.isfinite(eps) and seen == [[1]]
    assert blas_threads() == before
