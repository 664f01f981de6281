r"""Privacy accounting: the epsilon of everything a site released, and the noise for a target.

Everything a site releases about its users is a list of :class:`Event`\ s: ``steps``
Gaussian releases, each over a Poisson sample of the site's users at rate
``sample_rate`` (1.0: every user, a plain Gaussian mechanism), each with noise
``noise_multiplier`` times the L2 sensitivity of one user. DP-SGD steps, a
release of item-graph statistics and a secure sum are all such events, so one
accountant composes them.

**Continuous Gaussian noise** (every event with ``discrete = False``): Opacus's
PRV accountant (default) or its RDP accountant, over the whole list.
Google's ``dp-accounting`` recomputes the same epsilon independently (PLD for
PRV, its own RDP for RDP): :func:`independent_epsilon`.

**Distributed discrete Gaussian** (``discrete = True``; secure aggregation,
``common.distributed_noise``): integer noise whose sum over the sites is
close to a discrete Gaussian. Kairouz, Liu and Steinke (ICML 2021,
Proposition 14) bound one unsampled release by Rényi DP

.. math::
    \varepsilon(\alpha) = \min\Big(\frac{\alpha}{2 z^2} + \tau d,\;
        \frac{\alpha}{2}\big(\tfrac{1}{z} + \sqrt d\, \tau\big)^2\Big)

for noise multiplier :math:`z` (the sum's standard deviation over the
sensitivity after rounding), dimension :math:`d` and their :math:`\tau`
(:func:`common.distributed_noise.sum_inflation`; zero at this project's scales).
Poisson subsampling at rate :math:`q` uses the general bound of Zhu and Wang
(ICML 2019, "Poisson Subsampled Rényi Differential Privacy", Theorem 5) for
integer orders, which holds for any mechanism with that RDP curve:

.. math::
    \varepsilon'(\alpha) \le \frac{1}{\alpha - 1} \log\Big( (1-q)^{\alpha-1}(\alpha q - q + 1)
        + \tbinom{\alpha}{2} q^2 (1-q)^{\alpha-2} e^{\varepsilon(2)}
        + 3 \sum_{\ell=3}^{\alpha} \tbinom{\alpha}{\ell} (1-q)^{\alpha-\ell} q^\ell
          e^{(\ell-1)\varepsilon(\ell)} \Big)

(and never above the unsampled :math:`\varepsilon(\alpha)`). A list holding
any discrete event is composed in RDP, continuous events by Opacus's RDP of
the sampled Gaussian, and converted to :math:`(\varepsilon, \delta)` as
Opacus converts. The bound is looser than the sampled Gaussian's at large
:math:`q`; its check, :func:`independent_epsilon`, is then ``dp-accounting``'s
RDP of the same list with every event taken as continuous: a reference that
the discrete bound can only exceed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from scipy import special

# Opacus and dp-accounting are imported where they are used: in deployment every message
# starts a fresh ClientApp process, and an evaluation, which accounts nothing, would pay
# their imports (1.7 s together) for nothing.

RDP_ORDERS = (*range(2, 129), 256)
"""Integer Rényi orders (the subsampling bound for discrete events needs integers)."""


@dataclass(frozen=True)
class Event:
    """``steps`` releases, each over a Poisson sample of users at rate ``sample_rate``.

    Attributes:
        noise_multiplier: the noise's standard deviation over one user's L2
            sensitivity.
        sample_rate: Poisson sampling rate of users (1.0: every user).
        steps: how many such releases.
        discrete: distributed discrete Gaussian (secure aggregation) rather than
            continuous Gaussian noise.
        tau: Kairouz, Liu and Steinke's :math:`\\tau` (discrete events only).
        dimension: coordinates of each release (discrete events only).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    discrete: bool = False
    tau: float = 0.0
    dimension: int = 0


Events = Sequence[Event]


def epsilon(events: Events, delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of all ``events`` together (0 when there are none).

    ``accountant`` is ``"prv"`` or ``"rdp"`` (Opacus); lists with a discrete event
    are always composed in RDP (see the module docstring).
    """
    return _epsilon(_grouped(events), delta, accountant)


@lru_cache(maxsize=1024)
def _epsilon(events: tuple[Event, ...], delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant
    from opacus.accountants.analysis import rdp as opacus_rdp

    if not events:
        return 0.0
    if any(e.discrete for e in events):
        rdp = sum(_rdp(e) for e in events)
        spent = _quietly(opacus_rdp.get_privacy_spent, orders=RDP_ORDERS, rdp=rdp, delta=delta)
        return float(spent[0])
    opacus = create_accountant(accountant)
    opacus.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
    return float(_quietly(opacus.get_epsilon, delta))


def independent_epsilon(events: Events, delta: float, accountant: str) -> float:
    """The same epsilon by Google's ``dp-accounting`` (PLD for ``prv``, RDP for ``rdp`` or
    when a discrete event is present, with discrete events taken as continuous).

    The PLD's privacy-loss grid is 1e-3 wide: its pessimistic discretisation keeps an
    upper bound, and 1e-4 gives 9.51957 where it gives 9.51959 (two releases and 50 steps
    at sampling rate 0.1, all at sigma 1) at ten times the cost (1.5 s of every site's
    round, where the ledger is checked)."""
    return _independent_epsilon(_grouped(events), delta, accountant)


@lru_cache(maxsize=1024)
def _independent_epsilon(events: tuple[Event, ...], delta: float, accountant: str) -> float:
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    if not events:
        return 0.0
    pld = accountant == "prv" and not any(e.discrete for e in events)
    google = (
        pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
        if pld
        else rdp_privacy_accountant.RdpAccountant()
    )
    for e in events:
        gaussian = dp_accounting.GaussianDpEvent(e.noise_multiplier)
        step = (
            gaussian
            if e.sample_rate == 1.0
            else dp_accounting.PoissonSampledDpEvent(e.sample_rate, gaussian)
        )
        _quietly(google.compose, dp_accounting.SelfComposedDpEvent(step, e.steps))
    return float(_quietly(google.get_epsilon, delta))


def noise_multiplier_for(
    target: float, delta: float, accountant: str, planned: Event, before: Events = ()
) -> float:
    """The smallest noise multiplier of ``planned`` (its own value is ignored) for which
    ``before`` and ``planned`` together stay at or under ``target`` epsilon."""
    return _noise_multiplier_for(target, delta, accountant, planned, _grouped(before))


@lru_cache(maxsize=256)
def _noise_multiplier_for(
    target: float, delta: float, accountant: str, planned: Event, before: tuple[Event, ...]
) -> float:
    def spent(sigma: float) -> float:
        return epsilon((*before, replace(planned, noise_multiplier=sigma)), delta, accountant)

    low, high = 0.05, 1.0
    while spent(high) > target:
        low, high = high, 2 * high
        if high > 1e4:
            raise ValueError(
                f"no noise multiplier reaches epsilon {target} at delta {delta}: "
                f"the releases before it already spend {epsilon(before, delta, accountant):.3g}"
            )
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        low, high = (low, middle) if spent(middle) <= target else (middle, high)
    return high


def _grouped(events: Events) -> tuple[Event, ...]:
    """``events`` with equal releases added up: composition does not depend on order, and
    this keeps the accountants' work constant however many rounds a site has logged."""
    steps: dict[Event, int] = {}
    for e in events:
        key = replace(e, steps=0)
        steps[key] = steps.get(key, 0) + e.steps
    return tuple(
        sorted((replace(k, steps=n) for k, n in steps.items() if n), key=lambda e: repr(e))
    )


def _rdp(event: Event) -> np.ndarray:
    """The RDP curve of ``event`` over :data:`RDP_ORDERS` (see the module docstring)."""
    from opacus.accountants.analysis import rdp as opacus_rdp

    z, q = event.noise_multiplier, event.sample_rate
    if not event.discrete:
        return _quietly(
            opacus_rdp.compute_rdp, q=q, noise_multiplier=z, steps=event.steps, orders=RDP_ORDERS
        )

    def unsampled(order: int) -> float:
        return min(
            order / (2 * z**2) + event.tau * event.dimension,
            order / 2 * (1 / z + math.sqrt(event.dimension) * event.tau) ** 2,
        )

    curve = [
        unsampled(a) if q == 1.0 else min(unsampled(a), _subsampled(a, q, unsampled))
        for a in RDP_ORDERS
    ]
    return np.array(curve) * event.steps


def _subsampled(order: int, q: float, unsampled) -> float:
    """Zhu and Wang's Theorem 5 bound at integer ``order`` (module docstring)."""
    logs = [0.0, unsampled(2)]
    weights = [
        (1 - q) ** (order - 1) * (order * q - q + 1),
        special.comb(order, 2) * q**2 * (1 - q) ** (order - 2),
    ]
    for ell in range(3, order + 1):
        log_binomial = (
            special.gammaln(order + 1) - special.gammaln(ell + 1) - special.gammaln(order - ell + 1)
        )
        logs.append(
            (ell - 1) * unsampled(ell)
            + log_binomial
            + (order - ell) * math.log1p(-q)
            + ell * math.log(q)
        )
        weights.append(3.0)
    return float(special.logsumexp(logs, b=weights)) / (order - 1)


def _quietly(function, *args, **kwargs):
    """Call an accounting function without the warnings that say nothing a user can act
    on: Opacus's about the order range or ``log(0)`` at sampling rate 1, and
    dp-accounting's (through absl's log, at every call) that the series of a fractional
    RDP order near 1 did not converge, so that order is left out (the others bound
    epsilon)."""
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return function(*args, **kwargs)
    finally:
        absl_logging.set_verbosity(verbosity)
