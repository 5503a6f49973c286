"""Tests of common/dp/noise.py: the only source of DP noise.

Statistical tests use a failure probability of about 1e-6 per check (seeded ones are
deterministic; secure-mode ones are truly random and may fail that rarely).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from common.dp.noise import NoiseSource, privacy_noise
from common.paths import derive_seed

ALPHA = 1e-6  # two-sided failure probability of each statistical check
Z_CRIT = stats.norm.ppf(1 - ALPHA / 2)


def assert_normal_spread(x: torch.Tensor, std: float) -> None:
    """Mean ~ 0 (z-test) and sample variance ~ std^2 (chi-square test), each at ALPHA."""
    x = x.flatten().double().numpy()
    n = x.size
    assert abs(x.mean()) < Z_CRIT * std / math.sqrt(n), f"mean {x.mean()} too far from 0"
    stat = (n - 1) * x.var(ddof=1) / std**2
    lo, hi = stats.chi2.ppf(ALPHA / 2, n - 1), stats.chi2.ppf(1 - ALPHA / 2, n - 1)
    assert lo < stat < hi, f"sample std {x.std(ddof=1)} vs requested {std}"


def test_seeded_is_deterministic() -> None:
    a, b = NoiseSource.seeded(123), NoiseSource.seeded(123)
    first = a.normal((100,), 1.5)
    assert torch.equal(first, b.normal((100,), 1.5))
    assert torch.equal(a.normal((7, 3), 0.5), b.normal((7, 3), 0.5))  # streams stay in step
    assert not torch.equal(first, a.normal((100,), 1.5))  # successive draws differ


def test_different_seeds_differ() -> None:
    assert not torch.equal(NoiseSource.seeded(1).normal((50,), 1.0), NoiseSource.seeded(2).normal((50,), 1.0))


def test_huge_and_negative_seeds_are_accepted() -> None:
    for seed in (-1, 2**70, 0):
        assert NoiseSource.seeded(seed).normal((3,), 1.0).shape == (3,)


def test_seeded_does_not_touch_global_rng() -> None:
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    NoiseSource.seeded(5).normal((1000,), 1.0)
    NoiseSource.secure().normal((1000,), 1.0)
    assert torch.equal(torch_state, torch.get_rng_state())
    assert all(np.array_equal(a, b) for a, b in zip(np_state, np.random.get_state()))


def test_secure_ignores_global_seeds() -> None:
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            np.random.seed(0)
            first = NoiseSource.secure().normal((64,), 1.0)
            torch.manual_seed(0)
            np.random.seed(0)
            assert not torch.equal(first, NoiseSource.secure().normal((64,), 1.0))
    finally:
        np.random.set_state(np_state)


def test_seeded_spread() -> None:
    assert_normal_spread(NoiseSource.seeded(11).normal((50_000,), 3.0), 3.0)


@pytest.mark.parametrize("std", [1.0, 0.02, 250.0])
def test_secure_spread_and_ks(std: float) -> None:
    x = NoiseSource.secure().normal((50_000,), std)
    assert x.dtype == torch.float64 and torch.isfinite(x).all()
    assert_normal_spread(x, std)
    assert stats.kstest(x.numpy() / std, "norm").pvalue > 1e-4


def test_secure_pairs_are_uncorrelated() -> None:
    # Box-Muller makes two normals per uniform pair: the cos and sin halves must be independent.
    x = NoiseSource.secure().normal((50_000,), 1.0).numpy()
    half = x.size // 2
    for a, b in ((x[:half], x[half:]), (x[:-1], x[1:])):
        r = np.corrcoef(a, b)[0, 1]
        assert abs(r) < Z_CRIT / math.sqrt(a.size)


def test_secure_with_seed_raises() -> None:
    with pytest.raises(ValueError, match="secure"):
        NoiseSource(seed=3, secure=True)


def test_seeded_without_seed_raises() -> None:
    with pytest.raises(ValueError, match="seed"):
        NoiseSource(seed=None, secure=False)


def test_describe_names_the_source_and_never_a_seed() -> None:
    assert "os.urandom" in NoiseSource.secure().describe()
    seeded = NoiseSource.seeded(987654321).describe()
    assert "seeded-insecure" in seeded and "not private" in seeded
    assert not any(ch.isdigit() for ch in seeded)  # no seed, nor any part of one


def test_privacy_noise_is_the_os_csprng_unless_seeded_insecure() -> None:
    assert privacy_noise(True, 5, "server-noise").get_state() is None  # os: no state, no seed
    replayed = privacy_noise(False, 5, "server-noise").normal((8,), 1.0)
    assert torch.equal(replayed, NoiseSource.seeded(derive_seed(5, "server-noise")).normal((8,), 1.0))


@pytest.mark.parametrize("source", [NoiseSource.seeded(0), NoiseSource.secure()], ids=["seeded", "secure"])
@pytest.mark.parametrize("std", [-1.0, math.nan, math.inf, -math.inf])
def test_bad_std_raises(source: NoiseSource, std: float) -> None:
    with pytest.raises(ValueError, match="std"):
        source.normal((3,), std)


@pytest.mark.parametrize("source", [NoiseSource.seeded(0), NoiseSource.secure()], ids=["seeded", "secure"])
def test_zero_std_gives_zeros(source: NoiseSource) -> None:
    x = source.normal((4, 5), 0.0)
    assert x.dtype == torch.float64 and torch.equal(x, torch.zeros(4, 5, dtype=torch.float64))


@pytest.mark.parametrize("source", [NoiseSource.seeded(0), NoiseSource.secure()], ids=["seeded", "secure"])
@pytest.mark.parametrize("shape", [(), (0,), (1,), (3,), (7,), (2, 3, 5), (0, 4), torch.Size([5, 1])])
def test_odd_shapes(source: NoiseSource, shape: tuple[int, ...]) -> None:
    x = source.normal(shape, 1.0)
    assert tuple(x.shape) == tuple(shape) and x.dtype == torch.float64 and x.device.type == "cpu"
    assert torch.isfinite(x).all()
    if x.numel() > 1:
        assert x.unique().numel() == x.numel()  # no repeated draws (e.g. a lost half of a pair)
