"""Tests of common/secagg/: quantization, masks, Shamir sharing, distributed noise and its release."""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.crypto.shamir import combine_shares

from common.dp.mechanism import PrivacyEvent
from common.dp.noise import NoiseSource
from common.secagg import (
    QuantizationSpec,
    SecureSumResult,
    achieved_noise_multiplier,
    add_noise_share,
    agree,
    distributed_release,
    flatten_tree,
    generate_keypair,
    mask_input,
    noise_shares,
    pairwise_mask,
    reconstruct_secret,
    rounding_to_noise_ratio,
    share_secret,
    share_std,
    suggest_clip_range,
    unflatten_tree,
    unmask_sum,
)


# ---- quantization ------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [16, 32, 64])
def test_round_trip_error_is_within_half_a_level(bits):
    spec = QuantizationSpec.fit(clip_range=2.0, num_sites=5, modulus_bits=bits)
    x = np.random.default_rng(0).uniform(-2.0, 2.0, 10_000)
    err = np.abs(spec.decode_sum(spec.encode(x)) - x)
    assert err.max() <= spec.sum_error_bound(1, magnitude=2.0)
    assert err.max() <= 0.5 / spec.scale + 1e-15


def test_fit_satisfies_the_recoverability_bound_and_the_extremes_sum_exactly():
    spec = QuantizationSpec.fit(clip_range=1.0, num_sites=4, modulus_bits=16)
    assert spec.scale == 2.0**12  # 4 * ceil(1 * 4096) = 16384 < 2^15
    assert 4 * spec.max_level < 2**15 and spec.max_sites() >= 4
    for signs in itertools.product([-1.0, 1.0], repeat=4):
        parts = [spec.encode(np.array([s])) for s in signs]
        wrapped = spec.reduce(np.sum(parts, axis=0, dtype=np.uint64))
        assert spec.decode_sum(wrapped)[0] == sum(signs)


def test_too_many_sites_for_the_modulus_wrap_around():
    spec = QuantizationSpec.fit(clip_range=1.0, num_sites=4, modulus_bits=16)
    n = spec.max_sites() + 1  # the bound is violated: the sum of n maximal values wraps
    wrapped = spec.reduce(np.sum([spec.encode(np.array([1.0]))] * n, axis=0, dtype=np.uint64))
    assert spec.decode_sum(wrapped)[0] != n


def test_values_outside_the_clip_range_are_clamped_and_nan_refused():
    spec = QuantizationSpec.fit(clip_range=1.0, num_sites=2, modulus_bits=32)
    np.testing.assert_array_equal(spec.decode_sum(spec.encode(np.array([5.0, -7.0]))), [1.0, -1.0])
    with pytest.raises(ValueError, match="NaN"):
        spec.encode(np.array([np.nan]))


def test_spec_checks_and_config_round_trip():
    with pytest.raises(ValueError):
        QuantizationSpec(clip_range=0.0, scale=1.0)
    with pytest.raises(ValueError, match="modulus"):
        QuantizationSpec(clip_range=1.0, scale=2.0**20, modulus_bits=16)
    spec = QuantizationSpec.fit(3.0, 7)
    assert QuantizationSpec.from_config(spec.to_config("p-"), "p-") == spec


def test_tree_flattening_round_trip_and_shape_checks():
    shapes = {"a": (2, 3), "b": (4,)}
    tree = {"b": torch.arange(4.0), "a": torch.ones(2, 3)}
    vector = flatten_tree(tree, shapes)
    assert vector.dtype == np.float64 and vector.shape == (10,)
    back = unflatten_tree(vector, shapes)
    assert all(torch.equal(back[k], tree[k].double()) for k in shapes)
    with pytest.raises(ValueError, match="shape"):
        flatten_tree({"a": torch.ones(3, 2), "b": torch.ones(4)}, shapes)
    with pytest.raises(ValueError, match="missing"):
        flatten_tree({"a": torch.ones(2, 3)}, shapes)


# ---- masks -------------------------------------------------------------------------------
SPEC = QuantizationSpec.fit(clip_range=1.0, num_sites=4, modulus_bits=32)
NODES = [3, 8, 21, 40]


@pytest.fixture(scope="module")
def mask_keys():
    return {n: generate_keypair() for n in NODES}


def test_key_agreement_is_symmetric(mask_keys):
    (sk_a, pk_a), (sk_b, pk_b) = mask_keys[3], mask_keys[8]
    assert agree(sk_a, pk_b) == agree(sk_b, pk_a) and len(agree(sk_a, pk_b)) == 32


def test_pairwise_masks_cancel_exactly_in_z_m(mask_keys):
    total = np.zeros(1000, dtype=np.uint64)
    for u, v in itertools.permutations(NODES, 2):
        mask = pairwise_mask(agree(mask_keys[u][0], mask_keys[v][1]), 1000, SPEC, 7, u, v)
        assert mask.max() < SPEC.modulus and mask.any()
        total = total + mask
    np.testing.assert_array_equal(SPEC.reduce(total), 0)


def _masked_inputs(mask_keys, inputs, seeds, round_id=7):
    return {u: mask_input(inputs[u], spec=SPEC, round_id=round_id, own=u, self_seed=seeds[u],
                          mask_private_key=mask_keys[u][0],
                          peer_mask_keys={v: mask_keys[v][1] for v in NODES if v != u}) for u in NODES}


def test_masked_inputs_hide_the_input_and_unmask_to_the_exact_sum(mask_keys):
    rng = np.random.default_rng(1)
    inputs = {u: SPEC.encode(rng.uniform(-1, 1, 500)) for u in NODES}
    seeds = {u: os.urandom(32) for u in NODES}
    masked = _masked_inputs(mask_keys, inputs, seeds)
    assert all(not np.array_equal(masked[u], inputs[u]) for u in NODES)
    summed = unmask_sum(SPEC.reduce(np.sum(list(masked.values()), axis=0, dtype=np.uint64)), spec=SPEC, round_id=7,
                        self_seeds=seeds, dropped_keys={}, mask_public_keys={u: mask_keys[u][1] for u in NODES})
    np.testing.assert_array_equal(summed, SPEC.reduce(np.sum(list(inputs.values()), axis=0, dtype=np.uint64)))


def test_a_dropout_after_masking_is_unmasked_with_its_key(mask_keys):
    rng = np.random.default_rng(2)
    inputs = {u: SPEC.encode(rng.uniform(-1, 1, 300)) for u in NODES}
    seeds = {u: os.urandom(32) for u in NODES}
    masked = _masked_inputs(mask_keys, inputs, seeds)
    survivors = [3, 8, 40]  # 21 masked towards the others, then never sent its vector
    wrapped = SPEC.reduce(np.sum([masked[u] for u in survivors], axis=0, dtype=np.uint64))
    summed = unmask_sum(wrapped, spec=SPEC, round_id=7, self_seeds={u: seeds[u] for u in survivors},
                        dropped_keys={21: mask_keys[21][0]}, mask_public_keys={u: mask_keys[u][1] for u in survivors})
    expected = SPEC.decode_sum(SPEC.reduce(np.sum([inputs[u] for u in survivors], axis=0, dtype=np.uint64)))
    np.testing.assert_array_equal(SPEC.decode_sum(summed), expected)


def test_masks_depend_on_the_round(mask_keys):
    shared = agree(mask_keys[3][0], mask_keys[8][1])
    assert not np.array_equal(pairwise_mask(shared, 50, SPEC, 1, 3, 8), pairwise_mask(shared, 50, SPEC, 2, 3, 8))


# ---- Shamir ------------------------------------------------------------------------------
@pytest.mark.parametrize("secret", [os.urandom(32), generate_keypair()[0]], ids=["seed", "pem-key"])
def test_shamir_reconstructs_from_any_t_of_n_and_refuses_t_minus_1(secret):
    shares = share_secret(secret, threshold=3, num=5)
    for subset in itertools.combinations(shares, 3):
        assert reconstruct_secret(list(subset), 3) == secret
    assert reconstruct_secret(shares, 3) == secret
    with pytest.raises(ValueError, match="threshold 3"):
        reconstruct_secret(shares[:2], 3)
    with pytest.raises(ValueError):
        reconstruct_secret([shares[0]] * 3, 3)  # one share three times is still one share
    try:  # two shares carry no information: the raw combination is not the secret
        assert combine_shares(shares[:2]) != secret
    except ValueError:
        pass


# ---- distributed noise -------------------------------------------------------------------
def test_the_sum_of_m_shares_has_the_total_std():
    sigma, m, dim = 2.0, 5, 200_000
    total = sum(add_noise_share(np.zeros(dim), sigma, m, NoiseSource.seeded(i)) for i in range(m))
    assert share_std(sigma, m) == pytest.approx(sigma / math.sqrt(5))
    # std of the sample std is sigma / sqrt(2 * dim) ~ 0.3%: 2% is > 6 standard errors
    assert float(np.std(total)) == pytest.approx(sigma, rel=0.02)
    assert abs(float(np.mean(total))) < 5 * sigma / math.sqrt(dim)


def test_os_noise_shares_have_the_total_std_too():
    total = sum(add_noise_share(np.zeros(50_000), 1.5, 3, NoiseSource.secure()) for _ in range(3))
    assert float(np.std(total)) == pytest.approx(1.5, rel=0.03)


def test_achieved_noise_multiplier_with_dropouts():
    assert achieved_noise_multiplier(1.2, shares=5, survivors=5) == pytest.approx(1.2)
    assert achieved_noise_multiplier(1.2, shares=5, survivors=4) == pytest.approx(1.2 * math.sqrt(0.8))
    assert noise_shares("entered", entered=5, threshold=3) == 5
    # compensation: split by the threshold, any s >= t survivors carry at least the planned noise
    assert achieved_noise_multiplier(1.2, noise_shares("threshold", 5, 3), survivors=3) == pytest.approx(1.2)
    with pytest.raises(ValueError):
        noise_shares("nobody", 5, 3)


def test_rounding_is_negligible_against_the_noise_at_the_fitted_scale():
    spec = QuantizationSpec.fit(suggest_clip_range(1.0, 1.0, min_shares=3), num_sites=10)
    assert rounding_to_noise_ratio(spec, total_std=0.01, shares=10, survivors=10) < 1e-12
    coarse = QuantizationSpec(clip_range=10.0, scale=100.0, modulus_bits=32)
    assert rounding_to_noise_ratio(coarse, total_std=1.0, shares=10, survivors=10) == pytest.approx(
        math.sqrt(10 / 12) / 100 / 1.0)


def test_suggested_clip_range_leaves_room_for_the_noise_tail():
    assert suggest_clip_range(1.0, 3.0, min_shares=9, tail=8.0) == pytest.approx(1.0 + 8.0)


# ---- the distributed release ---------------------------------------------------------------
def test_the_distributed_release_divides_and_charges_the_achieved_multiplier():
    total = {"embedding": torch.arange(6, dtype=torch.float64)}
    result = SecureSumResult(total=total, survivors=[1, 2, 3], dropped=[4], entered=[1, 2, 3, 4], noise_shares=4)
    released, event = distributed_release(result, noise_multiplier=2.0, denominator=3.0, sample_rate=1.0,
                                          unit="site", label="round 1")
    assert torch.equal(released["embedding"], total["embedding"] / 3.0)
    assert event == PrivacyEvent.release(2.0 * math.sqrt(3 / 4), 1.0, "site", "round 1")
    no_noise = SecureSumResult(total=total, survivors=[1, 2], dropped=[], entered=[1, 2])
    assert distributed_release(no_noise, noise_multiplier=2.0, denominator=1.0, sample_rate=1.0,
                               unit="record")[1].noise_multiplier == 0.0
    with pytest.raises(ValueError, match="nothing to release"):
        distributed_release(SecureSumResult(None, [], [], []), noise_multiplier=1.0, denominator=1.0, sample_rate=1.0,
                            unit="site")
    with pytest.raises(ValueError, match="denominator"):
        distributed_release(result, noise_multiplier=1.0, denominator=0.0, sample_rate=1.0, unit="site")
