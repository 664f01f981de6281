r"""The DP contract in one place: unit, mechanism, accounting, ledger, releases.

**Privacy unit.** One user together with all of that user's interactions at one
site. Neighbouring datasets differ by adding or removing one user (and all
their interactions) at that site.

**Mechanism.** Each site runs DP-SGD (Opacus) over its own users: at every step
each user is included independently with probability :math:`q`
(``sample-rate``); the gradient of each included user's loss is clipped to
norm :math:`C` (``clip-norm``); Gaussian noise :math:`\mathcal N(0, \sigma^2
C^2 I)` is added to the sum. A user's gradient depends only on that user's
data and on parameters the server has already released (``common.model``), so
clipping bounds the user's influence. :math:`q`, :math:`C` and the number of
steps (``local-epochs / q`` per round) are public configuration and do not
depend on how many users a site has, so the guarantee holds under
add/remove-one-user.

**Noise.** :math:`\sigma` is ``noise-multiplier``, or, with ``target-epsilon``
set, the smallest :math:`\sigma` (Opacus's search) for which all planned steps
of the run (``num-server-rounds * local-epochs / q``) stay within
``target-epsilon`` at the site's :math:`\delta`.

**Delta.** ``delta = "auto"`` gives each site the largest power of ten at most
:math:`1 / (10 n)` for its :math:`n` users, so :math:`\delta < 1/n`. That value
reveals the order of magnitude of :math:`n`, and so does everything computed
from it (epsilon, a planned sigma): :func:`released_quantities` marks them as
not covered. A fixed ``delta`` keeps them public.

**Accounting.** Every step whose result can reach the server is composed over
all rounds a site ever trained in (the site's :class:`LedgerEntry` list, kept
on the site's disk; a round trained with ``dp = false`` makes every later
epsilon infinite), with Opacus's PRV accountant (default) or RDP accountant;
Google's ``dp-accounting`` (PLD for PRV, its own RDP for RDP) recomputes the
same epsilon independently. Releasing the item-side parameters after every
round, and anything computed from them, is post-processing.

**Releases.** :func:`released_quantities` lists every value a site sends, each
marked covered by the guarantee or not; the client refuses to send a key that
is not listed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import lru_cache

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common.config import RunConfig

PRIVACY_UNIT = "one user with all their interactions at one site"
NEIGHBOURING_RELATION = "add or remove one user (with all their interactions) at one site"

History = list[tuple[float, float, int]]
"""Opacus accountant history: ``(noise_multiplier, sample_rate, steps)`` entries."""


def accountant_with_history(kind: str, history: History) -> IAccountant:
    """A fresh Opacus accountant (``"prv"`` or ``"rdp"``) that has already seen ``history``."""
    accountant = create_accountant(kind)
    accountant.history = [tuple(step) for step in history]
    return accountant


def grouped(history: History) -> tuple[tuple[float, float, int], ...]:
    """``history`` with the steps of equal ``(sigma, rate)`` added up.

    Composition does not depend on order, so this is the same mechanism; it keeps
    the accountants' work constant however many rounds a site has logged.
    """
    steps: dict[tuple[float, float], int] = {}
    for sigma, rate, count in history:
        steps[(float(sigma), float(rate))] = steps.get((float(sigma), float(rate)), 0) + int(count)
    return tuple(sorted((sigma, rate, count) for (sigma, rate), count in steps.items()))


def epsilon_spent(kind: str, history: History, delta: float) -> float:
    """Epsilon at ``delta`` after every step in ``history`` (0 when empty), by Opacus."""
    return _opacus_epsilon(kind, grouped(history), delta)


@lru_cache(maxsize=256)
def _opacus_epsilon(kind: str, history: tuple, delta: float) -> float:
    if not history:
        return 0.0
    return float(accountant_with_history(kind, list(history)).get_epsilon(delta))


def independent_epsilon(kind: str, history: History, delta: float) -> float:
    """The same epsilon by Google's ``dp-accounting``: PLD for ``prv``, RDP for ``rdp``.

    Each history entry is a self-composition of a Poisson-subsampled Gaussian
    mechanism, as in Opacus.
    """
    return _google_epsilon(kind, grouped(history), delta)


@lru_cache(maxsize=256)
def _google_epsilon(kind: str, history: tuple, delta: float) -> float:
    if not history:
        return 0.0
    accountant = (
        pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
        if kind == "prv"
        else rdp_privacy_accountant.RdpAccountant()
    )
    for sigma, rate, steps in history:
        step = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(step, int(steps)))
    return float(accountant.get_epsilon(delta))


def site_delta(config: RunConfig, num_users: int) -> float:
    """The site's delta: the configured value, or ``auto`` (see the module docstring)."""
    if config.delta != "auto":
        return float(config.delta)
    return 10.0 ** math.floor(math.log10(1.0 / (10 * max(num_users, 1))))


def planned_steps(config: RunConfig) -> int:
    """DP-SGD steps a site takes if it trains in every round of the run."""
    return config.num_server_rounds * config.steps_per_round


def noise_multiplier_for(config: RunConfig, delta: float) -> float:
    """``noise-multiplier``, or the sigma that meets ``target-epsilon`` at ``delta``."""
    if config.target_epsilon == 0:
        return config.noise_multiplier
    return _planned_sigma(
        config.target_epsilon,
        delta,
        config.sampling_probability,
        planned_steps(config),
        config.accountant,
    )


@lru_cache(maxsize=32)
def _planned_sigma(epsilon: float, delta: float, rate: float, steps: int, kind: str) -> float:
    return float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=rate,
            steps=steps,
            accountant=kind,
            epsilon_tolerance=0.005,
        )
    )


@dataclass(frozen=True)
class LedgerEntry:
    """One round at one site, as its ledger records it.

    Attributes:
        run: name of the run (its run directory).
        round: the server round.
        trained: False when the site declined to train (``max-epsilon``).
        noise_multiplier, sample_rate, steps, clip_norm: the mechanism of the
            round (``steps`` is 0 when the site declined).
        delta: the site's delta.
        accountant: ``prv`` or ``rdp``.
        epsilon: epsilon of everything in the ledger up to this entry (Opacus).
        independent_epsilon: the same by ``dp-accounting``.
        noise_share: the noise multiplier of the site's own message: under secure
            aggregation the site adds only its share, ``noise_multiplier /
            sqrt(secagg-min-sites)``; otherwise equal to ``noise_multiplier``.
        single_message_epsilon: epsilon against a party that sees this site's
            message alone (the composition over ``noise_share``); equal to
            ``epsilon`` without secure aggregation.
    """

    run: str
    round: int
    trained: bool
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float
    accountant: str
    epsilon: float
    independent_epsilon: float
    noise_share: float
    single_message_epsilon: float

    def as_dict(self) -> dict[str, object]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> LedgerEntry:
        return cls(**{k.replace("-", "_"): v for k, v in values.items()})

    def metrics(self) -> dict[str, float]:
        """What the site reports of this entry to the server (see ``LEDGER_METRICS``)."""
        values = self.as_dict()
        return {k: float(values[k]) for k in LEDGER_METRICS} | {"declined": float(not self.trained)}

    @property
    def without_noise(self) -> bool:
        """A round trained with ``dp = false``: no bound on what it revealed."""
        return self.trained and self.noise_multiplier == 0


def ledger_history(entries: Iterable[LedgerEntry], single_message: bool = False) -> History:
    """The accountant history of every round a site trained in with DP: as the server
    sees it, or (``single_message``) as one site's message alone shows it."""
    return [
        (e.noise_share if single_message else e.noise_multiplier, e.sample_rate, e.steps)
        for e in entries
        if e.trained and not e.without_noise
    ]


@dataclass(frozen=True)
class Release:
    """One value a site sends to the server.

    Attributes:
        record: ``"arrays"`` or ``"metrics"`` (the record of the reply message).
        key: the key in that record; ``"<item-side parameters>"`` stands for
            every shared parameter of the model.
        message: ``"train"`` or ``"evaluate"`` reply.
        covered: whether the (epsilon, delta) guarantee covers it.
        why: the reason, in words a privacy officer can check.
    """

    record: str
    key: str
    message: str
    covered: bool
    why: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


CATALOGUE_FINGERPRINT = "catalogue-fingerprint"
"""Key of the catalogue's fingerprint in the server's messages (sites check it)."""
ITEM_SIDE = "<item-side parameters>"
ITEM_COUNTS = "item-counts"
MASKED_SUM = "<masked noised gradient sum>"
LEDGER_METRICS = (
    "epsilon",
    "independent-epsilon",
    "single-message-epsilon",
    "delta",
    "noise-multiplier",
    "steps",
)
"""What a site reports of each round's ledger entry (with ``declined``)."""


def metric_names(config: RunConfig) -> tuple[str, ...]:
    """Names of the evaluation metrics of the task, e.g. ``val-rmse``, ``test-ndcg@20``,
    and with cold-start items ``cold-rmse`` (and ``cold-rmse-without-text``)."""
    base = (
        ("rmse", "mae")
        if config.task == "rating"
        else (f"recall@{config.top_k}", f"ndcg@{config.top_k}")
    )
    names = [f"{part}-{name}" for part in ("val", "test") for name in base]
    if config.cold_item_fraction > 0:
        names += [f"cold-{name}" for name in base]
        if config.item_text:
            names += [f"cold-{name}-without-text" for name in base]
    return tuple(names)


def released_quantities(config: RunConfig) -> list[Release]:
    """Every value a site sends under ``config``, with its privacy status."""
    releases = [
        Release("metrics", "site-id", "train", True, "the site's public identity"),
        Release("metrics", "site-id", "evaluate", True, "the site's public identity"),
    ]
    if not config.dp:
        releases += [
            Release("arrays", ITEM_SIDE, "train", False, "dp = false: trained without noise"),
            Release(
                "arrays",
                ITEM_COUNTS,
                "train",
                False,
                "dp = false: exact per-item interaction counts, for count-weighted averaging",
            ),
            Release("metrics", "num-examples", "train", False, "dp = false: exact user count"),
            Release("metrics", "train-loss", "train", False, "dp = false: exact training loss"),
            Release("metrics", "num-examples", "evaluate", False, "dp = false: exact user count"),
        ]
    elif config.secure_aggregation:
        releases += [
            Release(
                "secagg",
                MASKED_SUM,
                "train",
                True,
                "SecAgg+ masks it: the server learns only the sum over at least "
                "secagg-min-sites sites, whose noise has standard deviation at least "
                "noise-multiplier x clip-norm (epsilon); the site's own message carries its "
                "share (single-message-epsilon)",
            ),
            Release("metrics", "num-examples", "train", True, "the constant public weight 1"),
            Release("metrics", "num-examples", "evaluate", True, "the constant 1"),
        ]
    else:
        releases.append(
            Release(
                "arrays",
                ITEM_SIDE,
                "train",
                True,
                "result of DP-SGD over the site's users (noised sums of clipped per-user "
                "gradients, then post-processing)",
            )
        )
    if config.dp:
        releases += _ledger_releases(config)
    releases += [
        Release(
            "metrics",
            name,
            "evaluate",
            False,
            "computed on the site's private validation/test interactions without noise",
        )
        for name in metric_names(config)
    ]
    return releases


def _ledger_releases(config: RunConfig) -> list[Release]:
    """The ledger values a DP site reports each round."""
    public = config.delta != "auto"
    why = (
        "a function of public configuration and of the rounds the site trained in"
        if public
        else 'delta = "auto" is the power of ten at most 1/(10 x users): it, and this '
        "value computed from it, reveal the order of magnitude of the site's user count"
    )
    return [
        *(
            Release("metrics", key, "train", public, why)
            for key in ("epsilon", "independent-epsilon", "single-message-epsilon", "delta")
        ),
        Release(
            "metrics",
            "noise-multiplier",
            "train",
            public or config.target_epsilon == 0,
            "the configured noise multiplier" if config.target_epsilon == 0 else why,
        ),
        Release("metrics", "steps", "train", True, "public configuration (1/q per epoch)"),
        Release(
            "metrics",
            "declined",
            "train",
            public or config.max_epsilon == 0,
            "whether the next round would exceed max-epsilon: a function of the values above",
        ),
    ]


def undeclared_releases(
    config: RunConfig,
    message: str,
    array_keys: Iterable[str],
    metric_keys: Iterable[str],
    item_side_keys: Iterable[str],
) -> list[str]:
    """Keys of a reply that :func:`released_quantities` does not list (should be empty)."""
    declared = {(r.record, r.key) for r in released_quantities(config) if r.message == message}
    item_side = set(item_side_keys)
    found = [("arrays", ITEM_SIDE if k in item_side else k) for k in array_keys]
    found += [("metrics", k) for k in metric_keys]
    return [f"{record}/{key}" for record, key in found if (record, key) not in declared]
