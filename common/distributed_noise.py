r"""Distributed discrete Gaussian noise for a secure sum (Kairouz, Liu and Steinke, ICML 2021).

Under secure aggregation the server sees only the sum of the sites' vectors, so
each site adds a share of the noise, and the sum must be computed on integers
modulo :math:`M` (SecAgg+). Continuous Gaussian noise quantised afterwards is
neither exactly what the accountant assumes nor closed under the sum, so the
noise is added in the integer domain instead. For a site's real vector
:math:`x \in \mathbb R^d` (a sum of per-user contributions, each of L2 norm at
most :math:`C`):

1. **Rotate** (public randomness, :func:`rotation`): zero-pad to
   :math:`d' = 2^{\lceil \log_2 d \rceil}` and apply :math:`U = H D / \sqrt{d'}`,
   with :math:`D` random signs and :math:`H` the Walsh-Hadamard matrix. :math:`U`
   is orthogonal (norms are kept) and spreads every vector evenly over the
   coordinates, so no single coordinate of the sum can overflow the modulus.
2. **Scale and round**: :math:`\gamma U x`, each coordinate rounded to one of its
   two neighbouring integers at random, without bias. With the scale
   :math:`\gamma = 100 \sqrt{d'} / C` the rounding moves the sensitivity of one
   user, :math:`\gamma C`, by at most :math:`\sqrt{d'}`: 1 %.
3. **Noise**: add :math:`\mathcal N_{\mathbb Z}(0, s^2)` to every coordinate
   (:func:`discrete_gaussian`), :math:`s = \sigma \gamma C / \sqrt T` for
   :math:`T` = ``secagg-min-sites``: the site's share of the noise.
4. **Reduce** modulo :math:`M = 2^b` (``secagg-bits``) into :math:`[-M/2, M/2)`.

SecAgg+ adds the sites' integers modulo :math:`M`. The server centres the sum
into :math:`[-M/2, M/2)`, divides by :math:`\gamma` and rotates back
(:func:`decode`): an unbiased estimate of :math:`\sum_s x_s` plus noise of
standard deviation :math:`\sigma C` (rounding adds a variance of at most 1/4
per coordinate and site, i.e. :math:`(C/200)^2 / d'`).

**Privacy** (for :mod:`common.accounting`). Adding or removing one user
moves :math:`\gamma U x` by at most :math:`\gamma C` in L2. Rounding both with
the same uniform draws moves each coordinate by at most one more, so the two
integer vectors are within :math:`\Delta = \gamma C + \sqrt{d'}`; by the joint
quasi-convexity of Rényi divergence the mixture over draws is at least as
private as the worst such pair. The noise of the at least :math:`T` sites in a
sum is a sum of discrete Gaussians; Kairouz, Liu and Steinke bound it with
their :math:`\tau` (:func:`sum_inflation`). The accountant therefore sees
noise multiplier :math:`z = \sigma\gamma C / \Delta = \sigma / 1.01`, dimension
:math:`d'` and :math:`\tau`. Other sites' vectors, further noise beyond
:math:`T` shares and the reduction modulo :math:`M` are post-processing.

The noise and rounding draw from a generator the caller seeds with fresh
operating-system entropy; acceptance tests use floating point, so like the
rest of this project this is not hardened against floating-point attacks
(see the README's limitations).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

ROUNDING_SLACK = 100.0
"""gamma * C = ROUNDING_SLACK * sqrt(d'): rounding adds 1 % to the sensitivity."""
ROUNDING_INFLATION = 1.0 + 1.0 / ROUNDING_SLACK
"""The sensitivity after rounding over the sensitivity before, whatever the dimension."""
OVERFLOW_MARGIN = 0.9
"""A centred sum coordinate beyond this share of M/2 means the sum wrapped around."""


@dataclass(frozen=True)
class IntegerCode:
    """How a vector of ``dimension`` reals becomes integers for the secure sum.

    Attributes:
        dimension: length :math:`d` of the real vector.
        clip_norm: :math:`C`, the L2 bound of one user's contribution.
        bits: :math:`b`, the sum is computed modulo :math:`2^b`.
        noise_multiplier: :math:`\\sigma` of the whole sum (relative to :math:`C`).
        min_sites: :math:`T`, the fewest sites any released sum holds.
    """

    dimension: int
    clip_norm: float
    bits: int
    noise_multiplier: float
    min_sites: int

    @property
    def padded(self) -> int:
        """:math:`d'`: the dimension rounded up to a power of two."""
        return 1 << max(0, math.ceil(math.log2(self.dimension)))

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def scale(self) -> float:
        """:math:`\\gamma`."""
        return ROUNDING_SLACK * math.sqrt(self.padded) / self.clip_norm

    @property
    def sensitivity(self) -> float:
        """:math:`\\Delta = \\gamma C + \\sqrt{d'}`: one user's L2 reach after rounding."""
        return self.scale * self.clip_norm + math.sqrt(self.padded)

    @property
    def share_std(self) -> float:
        """:math:`s`: the standard deviation of one site's integer noise."""
        return self.noise_multiplier * self.scale * self.clip_norm / math.sqrt(self.min_sites)

    @property
    def accounted_noise_multiplier(self) -> float:
        """:math:`z`: the sum's integer noise over the sensitivity after rounding."""
        return self.share_std * math.sqrt(self.min_sites) / self.sensitivity

    @property
    def tau(self) -> float:
        return sum_inflation(self.share_std, self.min_sites)


def sum_inflation(share_std: float, sites: int) -> float:
    r"""Kairouz, Liu and Steinke's :math:`\tau = 10 \sum_{k=1}^{n-1}
    e^{-2\pi^2 s^2 k/(k+1)}` for a sum of ``sites`` discrete Gaussians of standard
    deviation ``share_std`` (their Theorem 1); 0 in floating point once :math:`s` is a
    few units."""
    return 10 * sum(math.exp(-2 * math.pi**2 * share_std**2 * k / (k + 1)) for k in range(1, sites))


def round_seed(run_name: str, server_round: int) -> bytes:
    """The public seed of a round's rotation, known to the server and every site."""
    return hashlib.sha256(f"{run_name}|{server_round}".encode()).digest()


def rotation(seed: bytes, padded: int) -> np.ndarray:
    """The random signs :math:`D` of the public rotation for ``seed``."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed).digest(), "big"))
    return rng.choice(np.array([-1.0, 1.0]), size=padded)


def hadamard(vector: np.ndarray) -> np.ndarray:
    """:math:`H v / \\sqrt{d'}` (fast Walsh-Hadamard; ``len(vector)`` a power of two)."""
    out = vector.astype(np.float64, copy=True)
    n, half = len(out), 1
    while half < n:
        pairs = out.reshape(-1, 2, half)
        first, second = pairs[:, 0, :].copy(), pairs[:, 1, :]
        pairs[:, 0, :] += second
        pairs[:, 1, :] = first - second
        half *= 2
    return out / math.sqrt(n)


def discrete_gaussian(std: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` draws of :math:`\\mathcal N_{\\mathbb Z}(0, s^2)` by rejection from a discrete
    Laplace (Canonne, Kamath and Steinke, NeurIPS 2020, Algorithm 3), vectorised."""
    out = np.zeros(size, dtype=np.int64)
    if std == 0:
        return out
    t = math.floor(std) + 1
    pending = np.arange(size)
    while len(pending):
        p = -math.expm1(-1.0 / t)
        laplace = rng.geometric(p, len(pending)) - rng.geometric(p, len(pending))
        accept = rng.random(len(pending)) < np.exp(
            -((np.abs(laplace) - std**2 / t) ** 2) / (2 * std**2)
        )
        out[pending[accept]] = laplace[accept]
        pending = pending[~accept]
    return out


def encode(
    vector: np.ndarray, code: IntegerCode, seed: bytes, rng: np.random.Generator
) -> np.ndarray:
    """A site's real ``vector`` as noised integers in ``[-M/2, M/2)`` (steps 1-4 above)."""
    if vector.shape != (code.dimension,):
        raise ValueError(f"expected a vector of {code.dimension} values, got {vector.shape}")
    padded = np.zeros(code.padded)
    padded[: code.dimension] = vector
    rotated = hadamard(padded * rotation(seed, code.padded)) * code.scale
    below = np.floor(rotated)
    rounded = below.astype(np.int64) + (rng.random(code.padded) < rotated - below)
    noised = rounded + discrete_gaussian(code.share_std, code.padded, rng)
    return centred(noised, code.modulus)


def decode(integer_sum: np.ndarray, code: IntegerCode, seed: bytes) -> np.ndarray:
    """The real sum from the sites' integer sum (any representative modulo ``M``).

    Raises ``OverflowError`` when a coordinate lies so close to :math:`\\pm M/2` that the
    true sum has probably wrapped around the modulus (the result would be garbage).
    """
    total = centred(np.rint(integer_sum).astype(np.int64), code.modulus)
    if np.abs(total).max() > OVERFLOW_MARGIN * code.modulus / 2:
        raise OverflowError(
            f"the secure sum reached {np.abs(total).max()} of +-{code.modulus // 2}: it has "
            "probably wrapped around; raise secagg-bits"
        )
    rotated_back = hadamard(total / code.scale) * rotation(seed, code.padded)
    return rotated_back[: code.dimension]


def centred(values: np.ndarray, modulus: int) -> np.ndarray:
    """``values`` modulo ``modulus`` as the representatives in ``[-modulus/2, modulus/2)``."""
    half = modulus // 2
    return (values + half) % modulus - half
