"""The distributed discrete Gaussian: the secure sum it encodes, its noise, its sensitivity."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.distributed_noise import (
    IntegerCode,
    centred,
    decode,
    discrete_gaussian,
    encode,
    hadamard,
    sum_inflation,
)


def test_the_rotation_is_orthogonal_and_its_own_inverse():
    x = np.random.default_rng(0).normal(size=256)
    assert np.linalg.norm(hadamard(x)) == pytest.approx(np.linalg.norm(x))
    np.testing.assert_allclose(hadamard(hadamard(x)), x, atol=1e-12)


def test_without_noise_the_decoded_sum_is_the_sum_up_to_rounding():
    rng = np.random.default_rng(1)
    code = IntegerCode(dimension=1000, clip_norm=0.1, bits=24, noise_multiplier=0.0, min_sites=3)
    vectors = [rng.normal(size=1000) * 0.05 for _ in range(4)]
    shares = [encode(v, code, b"round-seed", rng) for v in vectors]
    assert all(s.min() >= -(2**23) and s.max() < 2**23 for s in shares)
    total = decode(sum(shares), code, b"round-seed")
    # each site's rounding moves each rotated coordinate by less than 1/gamma
    assert np.abs(total - sum(vectors)).max() < 4 * math.sqrt(code.padded) / code.scale


def test_the_sum_carries_noise_sigma_c_with_min_sites_shares():
    rng = np.random.default_rng(2)
    code = IntegerCode(dimension=500, clip_norm=0.1, bits=24, noise_multiplier=1.5, min_sites=4)
    zero = np.zeros(500)
    errors = np.concatenate(
        [decode(sum(encode(zero, code, b"7", rng) for _ in range(4)), code, b"7") for _ in range(8)]
    )
    assert errors.std() == pytest.approx(1.5 * 0.1, rel=0.05)


def test_sums_wrap_modulo_m_and_centre_back():
    modulus = 2**16
    values = np.array([-(2**15), -5, 0, 7, 2**15 - 1])
    assert np.array_equal(centred(values + 3 * modulus, modulus), values)


def test_a_wrapped_sum_is_refused_rather_than_decoded_as_garbage():
    code = IntegerCode(dimension=4, clip_norm=1.0, bits=16, noise_multiplier=0.0, min_sites=2)
    with pytest.raises(OverflowError, match="secagg-bits"):
        decode(np.array([2**15 - 1, 0, 0, 0]), code, b"0")


@pytest.mark.parametrize("std", [0.8, 3.0, 2500.0])
def test_discrete_gaussian_has_the_stated_spread(std):
    draws = discrete_gaussian(std, 200_000, np.random.default_rng(3))
    assert draws.dtype == np.int64
    assert abs(draws.mean()) < 0.02 * std + 0.01
    assert draws.std() == pytest.approx(std, rel=0.02)


def test_the_accounted_sensitivity_includes_the_rounding():
    code = IntegerCode(dimension=33489, clip_norm=0.1, bits=24, noise_multiplier=1.0, min_sites=2)
    assert code.padded == 2**16
    assert code.sensitivity == pytest.approx(code.scale * 0.1 + math.sqrt(2**16))
    assert code.accounted_noise_multiplier == pytest.approx(1 / 1.01)
    assert sum_inflation(code.share_std, 10) == 0.0  # tau vanishes at these scales
    assert sum_inflation(0.5, 10) > 0
