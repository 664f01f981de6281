r"""The DP contract in one place: unit, mechanism, accounting, and what is released.

**Privacy unit.** One user together with all of that user's interactions at one
site. Neighbouring datasets differ by adding or removing one user (and all
their interactions) at that site.

**Mechanism.** Each site runs DP-SGD (Opacus) over its own users: at every step
each user is included independently with probability :math:`q`
(``sample-rate``); the gradient of each included user's loss is clipped to
norm :math:`C` (``clip-norm``); Gaussian noise :math:`\mathcal N(0, \sigma^2
C^2 I)` (``noise-multiplier`` :math:`\sigma`) is added to the sum. A user's
gradient depends only on that user's data and on parameters the server has
already released (``common.model``), so clipping bounds the user's influence.
:math:`q`, :math:`\sigma`, :math:`C` and the number of steps
(``local-epochs / q`` per round) are public configuration and do not depend on
how many users a site has, so the guarantee holds under add/remove-one-user and
the epsilon itself reveals nothing about a site's data.

**Accounting.** Every step whose result can reach the server is composed over
all rounds a site takes part in, with Opacus's PRV accountant (default) or RDP
accountant. Releasing the item-side parameters after every round, and anything
computed from them, is post-processing.

**Releases.** :func:`released_quantities` lists every value a site sends, each
marked covered by the guarantee or not; the client refuses to send a key that
is not listed, and the run directory records the list.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from opacus.accountants import IAccountant, create_accountant

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


def epsilon_spent(kind: str, history: History, delta: float) -> float:
    """Epsilon at ``delta`` after every step in ``history`` (0 when empty)."""
    if not history:
        return 0.0
    return float(accountant_with_history(kind, history).get_epsilon(delta))


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


ITEM_SIDE = "<item-side parameters>"
ITEM_COUNTS = "item-counts"


def metric_names(config: RunConfig) -> tuple[str, ...]:
    """Names of the evaluation metrics of the task, e.g. ``val-rmse``, ``test-ndcg@20``."""
    base = (
        ("rmse", "mae")
        if config.task == "rating"
        else (f"recall@{config.top_k}", f"ndcg@{config.top_k}")
    )
    return tuple(f"{part}-{name}" for part in ("val", "test") for name in base)


def released_quantities(config: RunConfig) -> list[Release]:
    """Every value a site sends under ``config``, with its privacy status."""
    releases = [
        Release("metrics", "site-id", "train", True, "the site's public identity"),
        Release("metrics", "site-id", "evaluate", True, "the site's public identity"),
    ]
    if config.dp:
        releases += [
            Release(
                "arrays",
                ITEM_SIDE,
                "train",
                True,
                "result of DP-SGD over the site's users (noised sums of clipped per-user "
                "gradients, then post-processing)",
            ),
            Release(
                "metrics",
                "epsilon",
                "train",
                True,
                "a function of public configuration only (sigma, q, steps, delta)",
            ),
        ]
    else:
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
