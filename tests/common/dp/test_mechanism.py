"""Tests of common/dp/mechanism.py: bounding, summing, releasing, and the event it emits.

Exact cases run with noise_multiplier 0; the noise is checked statistically (z-test of the
mean, chi-square test of the variance, each at failure probability ALPHA with fixed seeds).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from common.dp.mechanism import GaussianSumMechanism, PrivacyEvent, site_scope
from common.dp.noise import NoiseSource

ALPHA = 1e-6
Z_CRIT = stats.norm.ppf(1 - ALPHA / 2)
MODES = ("clip", "normalize")


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


# ---- construction -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        {"clip_norm": 0.0, "noise_multiplier": 1.0},
        {"clip_norm": -1.0, "noise_multiplier": 1.0},
        {"clip_norm": math.inf, "noise_multiplier": 1.0},
        {"clip_norm": math.nan, "noise_multiplier": 1.0},
        {"clip_norm": 1.0, "noise_multiplier": -0.1},
        {"clip_norm": 1.0, "noise_multiplier": math.nan},
        {"clip_norm": 1.0, "noise_multiplier": math.inf},
        {"clip_norm": 1.0, "noise_multiplier": 1.0, "bound_mode": "scale"},
    ],
)
def test_invalid_mechanism_raises(kw: dict) -> None:
    with pytest.raises(ValueError):
        GaussianSumMechanism(**kw)


def test_noise_std_is_z_times_c() -> None:
    assert GaussianSumMechanism(clip_norm=0.5, noise_multiplier=3.0).noise_std == 1.5


@pytest.mark.parametrize(
    "kw",
    [
        {"noise_multiplier": 1.0, "sample_rate": 0.0},
        {"noise_multiplier": 1.0, "sample_rate": 1.5},
        {"noise_multiplier": 1.0, "sample_rate": math.nan},
        {"noise_multiplier": -1.0, "sample_rate": 0.5},
        {"noise_multiplier": math.inf, "sample_rate": 0.5},
        {"noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 0},
        {"noise_multiplier": 1.0, "sample_rate": 0.5, "sampling": "none"},
    ],
)
def test_invalid_event_raises(kw: dict) -> None:
    with pytest.raises(ValueError):
        PrivacyEvent(**kw)


def test_event_dict_round_trip() -> None:
    e = PrivacyEvent(noise_multiplier=1.2, sample_rate=0.3, steps=4, unit="site", label="round 3")
    assert PrivacyEvent.from_dict(e.to_dict()) == e


# ---- bounding: worked examples ----------------------------------------------------------
def test_clip_worked_example() -> None:
    m = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0)
    close(m.bound_rows(t64(3.0, 4.0)[None])[0], t64(0.6, 0.8))


def test_clip_below_bound_is_unchanged() -> None:
    m = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0)
    x = t64(0.3, 0.4)[None]
    assert torch.equal(m.bound_rows(x), x)


def test_clip_at_bound_is_unchanged() -> None:
    m = GaussianSumMechanism(clip_norm=5.0, noise_multiplier=0.0)
    x = t64(3.0, 4.0)[None]
    assert torch.equal(m.bound_rows(x), x)


def test_clip_factor_is_exactly_one_at_and_below_the_bound() -> None:
    # Regression: C / norm computed as C * (1 / norm) gave 0.9999999999999999 for norm == C
    # (e.g. C = 25.75) and shrank records that were already within the bound.
    cs = torch.from_numpy(np.random.default_rng(0).uniform(1e-3, 1e3, 10_000))
    for c in [25.75, 0.1, 0.05, 3.0, *cs[:50].tolist()]:
        m = GaussianSumMechanism(clip_norm=c, noise_multiplier=0.0)
        norms = t64(c, np.nextafter(c, 0.0), c / 2)
        assert torch.equal(m.scale_factors(norms), t64(1.0, 1.0, 1.0))
        x = t64(0.0, c)[None]
        assert torch.equal(m.bound_rows(x), x)
        assert torch.equal(m.bound_tree({"a": t64(c)})["a"], t64(c))
    m = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0)
    assert torch.all(m.scale_factors(cs) == torch.clamp(torch.from_numpy(1.0 / cs.numpy()), max=1.0))


def test_normalize_scales_up_to_c() -> None:
    m = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0, bound_mode="normalize")
    close(m.bound_rows(t64(0.3, 0.4)[None])[0], t64(0.6, 0.8))
    close(m.bound_rows(t64(3.0, 4.0)[None])[0], t64(0.6, 0.8))


def test_rows_are_bounded_independently() -> None:
    m = GaussianSumMechanism(clip_norm=2.0, noise_multiplier=0.0)
    x = torch.tensor([[[3.0, 0.0], [0.0, 4.0]], [[0.1, 0.1], [0.1, 0.1]], [[0.0, 0.0], [0.0, 0.0]]])
    out = m.bound_rows(x)
    assert out.shape == x.shape and out.dtype == torch.float64
    close(out[0], torch.tensor([[1.2, 0.0], [0.0, 1.6]], dtype=torch.float64))  # norm 5 over both dims
    assert torch.equal(out[1], x[1].double()) and torch.equal(out[2], x[2].double())


def test_bound_tree_uses_flat_norm() -> None:
    m = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0)
    out = m.bound_tree({"a": t64(3.0), "b": t64(4.0)})
    close(out["a"], t64(0.6))
    close(out["b"], t64(0.8))
    # Each tensor alone is within a per-tensor bound of 5, but the record is not within 1.
    out = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0, bound_mode="normalize").bound_tree(
        {"a": torch.tensor([[0.3]], dtype=torch.float64), "b": t64(0.0, 0.4)}
    )
    close(out["a"], torch.tensor([[0.6]], dtype=torch.float64))
    close(out["b"], t64(0.0, 0.8))


def test_bound_tree_below_bound_is_unchanged() -> None:
    m = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0)
    rec = {"a": t64(0.1, 0.2), "b": t64(0.3)}
    out = m.bound_tree(rec)
    assert out.keys() == rec.keys() and all(torch.equal(out[k], rec[k]) for k in rec)


def test_bounding_does_not_modify_input() -> None:
    x = torch.tensor([[3.0, 4.0]], requires_grad=True)
    before = x.detach().clone()
    rec = {"w": x}
    m = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0)
    m.bound_rows(x)
    m.bound_tree(rec)
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("mode", MODES)
def test_zero_record_stays_zero(mode: str) -> None:
    m = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0, bound_mode=mode)
    rows = m.bound_rows(torch.zeros(2, 3))
    tree = m.bound_tree({"a": torch.zeros(3), "b": torch.zeros(2, 2)})
    assert torch.equal(rows, torch.zeros(2, 3, dtype=torch.float64))
    assert all(torch.equal(v, torch.zeros_like(v)) for v in tree.values())
    assert m.bound_tree({}) == {}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_record_raises(mode: str, bad: float) -> None:
    m = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0, bound_mode=mode)
    with pytest.raises(ValueError, match="NaN or infinite"):
        m.bound_rows(torch.tensor([[0.1, 0.2], [bad, 0.0]]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        m.bound_tree({"a": torch.tensor([0.1]), "b": torch.tensor([bad])})


def test_overflowing_norm_fails_safe() -> None:
    # A finite float64 record whose norm overflows float64 is refused, not passed through.
    m = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0)
    with pytest.raises(ValueError):
        m.bound_rows(t64(1e200, 1e200)[None])


# ---- bounding: properties ---------------------------------------------------------------
# float64 magnitudes in [1e-100, 1e100] (or 0): the squared norm neither under- nor overflows.
# (float32 records, the real inputs, are covered over their whole finite range below.)
MAGNITUDE = st.one_of(st.just(0.0), st.floats(1e-100, 1e100))
FLOAT64 = st.builds(lambda m, neg: -m if neg else m, MAGNITUDE, st.booleans())
ROWS = hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=6), elements=FLOAT64)
CLIP = st.floats(1e-3, 1e3)
TOL = 1e-12


def _check_bounded(x: np.ndarray, out: np.ndarray, c: float, mode: str) -> None:
    """Row-wise: norm <= C, direction kept, clip leaves small rows bitwise alone."""
    xf, of = x.reshape(len(x), -1), out.reshape(len(x), -1)
    for row, bounded in zip(xf, of):
        norm_in, norm_out = np.linalg.norm(row), np.linalg.norm(bounded)
        assert norm_out <= c * (1 + TOL)
        if norm_in == 0:
            assert not bounded.any()
            continue
        cosine = float(row @ bounded) / (norm_in * norm_out) if norm_out > 0 else 1.0
        assert cosine == pytest.approx(1.0, abs=TOL)
        assert np.all(np.sign(bounded) == np.sign(row))
        if mode == "clip" and norm_in <= c:
            assert np.array_equal(bounded, row)
        if mode == "normalize" or norm_in > c:
            assert norm_out == pytest.approx(c, rel=TOL)


@settings(max_examples=100, deadline=None)
@given(x=ROWS, c=CLIP, mode=st.sampled_from(MODES))
def test_bound_rows_properties(x: np.ndarray, c: float, mode: str) -> None:
    m = GaussianSumMechanism(clip_norm=c, noise_multiplier=0.0, bound_mode=mode)
    _check_bounded(x, m.bound_rows(torch.from_numpy(x)).numpy(), c, mode)


@settings(max_examples=100, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 8)),
                 elements=st.floats(allow_nan=False, allow_infinity=False, width=32)),
    c=CLIP,
    mode=st.sampled_from(MODES),
)
def test_bound_rows_any_finite_float32(x: np.ndarray, c: float, mode: str) -> None:
    m = GaussianSumMechanism(clip_norm=c, noise_multiplier=0.0, bound_mode=mode)
    out = m.bound_rows(torch.from_numpy(x)).numpy()
    _check_bounded(x.astype(np.float64), out, c, mode)


@settings(max_examples=100, deadline=None)
@given(
    parts=st.lists(hnp.arrays(np.float64, hnp.array_shapes(min_dims=0, max_dims=2, max_side=4), elements=FLOAT64),
                   min_size=1, max_size=4),
    c=CLIP,
    mode=st.sampled_from(MODES),
)
def test_bound_tree_properties(parts: list[np.ndarray], c: float, mode: str) -> None:
    m = GaussianSumMechanism(clip_norm=c, noise_multiplier=0.0, bound_mode=mode)
    tree = {f"t{i}": torch.from_numpy(p) for i, p in enumerate(parts)}
    out = m.bound_tree(tree)
    assert out.keys() == tree.keys() and all(out[k].shape == tree[k].shape for k in tree)
    flat_in = np.concatenate([p.ravel() for p in parts])[None]
    flat_out = np.concatenate([out[k].numpy().ravel() for k in tree])[None]
    _check_bounded(flat_in, flat_out, c, mode)


# ---- summing ----------------------------------------------------------------------------
def test_add_merges_partial_sums() -> None:
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([[0.5]])}
    b = {"x": torch.tensor([0.25, -2.0], dtype=torch.float64), "y": torch.tensor([[1.5]])}
    total = GaussianSumMechanism.add(None, a)
    assert all(v.dtype == torch.float64 for v in total.values())
    total = GaussianSumMechanism.add(total, b)
    assert torch.equal(total["x"], t64(1.25, 0.0)) and torch.equal(total["y"], torch.tensor([[2.0]], dtype=torch.float64))
    assert torch.equal(a["x"], torch.tensor([1.0, 2.0]))  # inputs untouched


def test_add_is_order_free_for_site_sums() -> None:
    rng = torch.Generator().manual_seed(0)
    parts = [{"w": torch.randn(5, generator=rng, dtype=torch.float64)} for _ in range(3)]
    one = GaussianSumMechanism.add(GaussianSumMechanism.add(GaussianSumMechanism.add(None, parts[0]), parts[1]), parts[2])
    other = GaussianSumMechanism.add(GaussianSumMechanism.add(None, parts[2]), GaussianSumMechanism.add(
        GaussianSumMechanism.add(None, parts[0]), parts[1]))
    torch.testing.assert_close(one["w"], other["w"], rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "part,match",
    [
        ({"x": torch.zeros(2)}, "keys"),
        ({"x": torch.zeros(2), "y": torch.zeros(1), "z": torch.zeros(1)}, "keys"),
        ({"x": torch.zeros(2), "q": torch.zeros(1)}, "keys"),
        ({"x": torch.zeros(3), "y": torch.zeros(1)}, "shape"),
        ({"x": torch.zeros(2, 1), "y": torch.zeros(1)}, "shape"),
    ],
)
def test_add_rejects_mismatch(part: dict, match: str) -> None:
    total = GaussianSumMechanism.add(None, {"x": torch.zeros(2), "y": torch.zeros(1)})
    with pytest.raises(ValueError, match=match):
        GaussianSumMechanism.add(total, part)


# ---- release ----------------------------------------------------------------------------
def _release(m: GaussianSumMechanism, total: dict, seed: int = 0, q: float = 0.5, denominator: float = 4.0):
    return m.release(total, denominator=denominator, noise=NoiseSource.seeded(seed), sample_rate=q, unit="record")


def test_release_without_noise_is_exact_mean() -> None:
    m = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0)
    records = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, -0.5]], dtype=torch.float64)
    site_a = {"w": m.bound_rows(records[:2]).sum(0)}
    site_b = {"w": m.bound_rows(records[2:]).sum(0)}
    total = m.add(m.add(None, site_a), site_b)
    out, _ = _release(m, total, denominator=2.5)
    assert out["w"].dtype == torch.float64
    assert torch.equal(out["w"], total["w"] / 2.5)
    close(out["w"], t64(0.9 / 2.5, 0.7 / 2.5))


@pytest.mark.parametrize("q,sampling", [(0.25, "poisson"), (1.0, "none")])
def test_release_event(q: float, sampling: str) -> None:
    m = GaussianSumMechanism(clip_norm=0.7, noise_multiplier=1.3)
    _, event = m.release({"w": torch.zeros(3)}, denominator=1.0, noise=NoiseSource.seeded(0),
                         sample_rate=q, unit="site", label="round 1")
    assert event == PrivacyEvent(noise_multiplier=1.3, sample_rate=q, steps=1, unit="site",
                                 sampling=sampling, adjacency="add-remove", label="round 1")


@pytest.mark.parametrize("denominator", [0.0, -1.0, math.inf, math.nan])
def test_release_rejects_bad_denominator(denominator: float) -> None:
    m = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="denominator"):
        _release(m, {"w": torch.zeros(2)}, denominator=denominator)


def test_release_rejects_bad_sample_rate() -> None:
    m = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="sample_rate"):
        _release(m, {"w": torch.zeros(2)}, q=0.0)


def test_release_is_reproducible_with_seed() -> None:
    m = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=2.0)
    total = {"a": torch.ones(100), "b": torch.zeros(3, 3)}
    one, two, other = _release(m, total, seed=7)[0], _release(m, total, seed=7)[0], _release(m, total, seed=8)[0]
    assert all(torch.equal(one[k], two[k]) for k in total)
    assert all(not torch.equal(one[k], other[k]) for k in total)


# z, C, q, N: the release's noise has std z*C/(q*N) per coordinate.
SPREAD_CASES = [(1.3, 0.7, 0.25, 40), (0.5, 2.0, 1.0, 3), (8.0, 0.05, 0.01, 10_000)]


def assert_spread(residual: np.ndarray, std: float) -> None:
    """z-test of the mean and chi-square test of the variance, each at ALPHA."""
    residual = residual.ravel()
    n = residual.size
    assert abs(residual.mean()) < Z_CRIT * std / math.sqrt(n), "noise mean is not ~0"
    stat = (n - 1) * residual.var(ddof=1) / std**2
    lo, hi = stats.chi2.ppf(ALPHA / 2, n - 1), stats.chi2.ppf(1 - ALPHA / 2, n - 1)
    assert lo < stat < hi, f"noise std {residual.std(ddof=1)} vs expected {std}"


@pytest.mark.parametrize("z,c,q,n", SPREAD_CASES)
def test_noise_spread_one_large_release(z: float, c: float, q: float, n: int) -> None:
    m = GaussianSumMechanism(clip_norm=c, noise_multiplier=z)
    total = {"w": torch.randn(200, 100, generator=torch.Generator().manual_seed(1), dtype=torch.float64)}
    out, _ = m.release(total, denominator=q * n, noise=NoiseSource.seeded(2), sample_rate=q, unit="record")
    assert_spread((out["w"] - total["w"] / (q * n)).numpy(), z * c / (q * n))


@pytest.mark.parametrize("z,c,q,n", SPREAD_CASES)
def test_noise_spread_many_small_releases(z: float, c: float, q: float, n: int) -> None:
    m = GaussianSumMechanism(clip_norm=c, noise_multiplier=z)
    total = {"w": t64(0.5, -1.0, 2.0, 0.0)}
    noise = NoiseSource.seeded(3)
    residuals = np.stack([
        (m.release(total, denominator=q * n, noise=noise, sample_rate=q, unit="site")[0]["w"] - total["w"] / (q * n)).numpy()
        for _ in range(5_000)
    ])
    std = z * c / (q * n)
    assert_spread(residuals, std)
    for coordinate in residuals.T:  # each coordinate on its own, too
        assert_spread(coordinate, std)


def test_noise_is_independent_across_tensors_and_releases() -> None:
    m = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=1.0)
    total = {"a": torch.zeros(20_000), "b": torch.zeros(20_000)}
    noise = NoiseSource.seeded(4)
    first, _ = m.release(total, denominator=1.0, noise=noise, sample_rate=1.0, unit="record")
    second, _ = m.release(total, denominator=1.0, noise=noise, sample_rate=1.0, unit="record")
    limit = Z_CRIT / math.sqrt(20_000)
    for x, y in ((first["a"], first["b"]), (first["a"], second["a"]), (first["b"], second["b"])):
        assert abs(np.corrcoef(x.numpy(), y.numpy())[0, 1]) < limit


# ---- the server's bounding: scale factor and norms --------------------------------------
@settings(max_examples=200, deadline=None)
@given(norm=st.one_of(st.just(0.0), st.floats(0.0, 1e300, allow_subnormal=True)), c=CLIP, mode=st.sampled_from(MODES))
def test_scale_factor_is_scale_factors_bit_for_bit(norm: float, c: float, mode: str) -> None:
    m = GaussianSumMechanism(clip_norm=c, noise_multiplier=0.0, bound_mode=mode)
    for value in (norm, c, math.nextafter(c, 0), math.nextafter(c, math.inf)):
        assert m.scale_factor(value) == float(m.scale_factors(t64(value))[0])


def test_sum_of_squares_of_a_tree_spans_tensors_and_is_float64(monkeypatch) -> None:
    from common.dp import flatsum
    from common.dp import mechanism as mech

    parts = [np.linspace(-2, 2, n, dtype=np.float32) for n in (5, 70_000, 1, 3)]
    exact = math.fsum(float(x) ** 2 for p in parts for x in p.astype(np.float64))
    squares = mech.tree_sum_of_squares(parts)
    assert math.isclose(squares, exact, rel_tol=1e-12)
    assert squares == flatsum.flat_sum_of_squares(parts) == flatsum.flat_sum_of_squares(parts, (5, 70_000, 1, 3))
    monkeypatch.setattr(flatsum, "_SQUARES_CHUNK", 7)  # many runs, each across tensors
    assert math.isclose(mech.tree_sum_of_squares(parts), exact, rel_tol=1e-12)


# ---- the event builders ------------------------------------------------------------------

def test_the_event_builders_fill_the_fields_as_written_out():
    assert PrivacyEvent.release(1.5, 0.25, "site", "round 2") == PrivacyEvent(
        noise_multiplier=1.5, sample_rate=0.25, steps=1, unit="site", scope="all", label="round 2")
    assert PrivacyEvent.planned(1.5, 1.0, 7, "record") == PrivacyEvent(
        noise_multiplier=1.5, sample_rate=1.0, steps=7, unit="record", sampling="none")
    assert PrivacyEvent.dpsgd(0.9, 0.5, 10, scope=site_scope(3), label="dp-sgd") == PrivacyEvent(
        noise_multiplier=0.9, sample_rate=0.5, steps=10, unit="record", scope="site-3", label="dp-sgd")
    assert PrivacyEvent.planned(0.9, 0.5, 10, "site", scope="each-site", label="x").to_dict() == {
        "noise_multiplier": 0.9, "sample_rate": 0.5, "steps": 10, "unit": "site", "sampling": "poisson",
        "adjacency": "add-remove", "scope": "each-site", "label": "x"}
