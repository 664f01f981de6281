"""Train / validation / test splits, per user, with each user's own randomness.

Every user keeps at least one training interaction. How many of a user's ``n``
interactions are held out (``per``):

- ``"user"``: ``floor(n * fraction)``. A user with fewer than ``1 / fraction``
  interactions holds out none, so on sparse data the held-out share can fall far
  below ``fraction``.
- ``"dataset"``: each interaction is held out with probability ``fraction``
  (a binomial count of the user's interactions), so the overall share is
  ``fraction`` in expectation, less what keeping one training interaction per
  user puts back (every interaction of a one-interaction user stays in training).

Which ones (``by``): ``"random"``, a uniformly random subset, or ``"time"``,
the latest (ties broken at random). Test is held out first, then validation
from the rest (with ``val_fraction / (1 - test_fraction)``, so that both are
shares of all interactions). A source's canonical split (MovieLens ``u1``..``ub``,
LightGCN, the ``csv`` loader's ``test-path``) keeps its test set; validation is
the source's own (``val-path``) or carved from its training set at random by
the same rule.

All draws for a user come from the user's own generator, seeded by the seed, a
purpose tag and the user's stable key (:mod:`common.data.keys`), over the
user's interactions in a canonical order (by item, then timestamp): removing one
user's interactions changes no other user's split.

Cold-start items: with ``cold_fraction > 0`` a random share of the catalogue
(by seed; the choice is public) is held out of all training data. Every
interaction with those items, whichever split it fell in, moves to ``cold``:
the model never sees these items trained, and ``cold`` measures how well it
recommends them from their text alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.data.dataset import Dataset, Interactions
from common.data.keys import TEST_HOLDOUT, VAL_HOLDOUT, keyed_generator, user_keys
from common.errors import InputError

SPLITS = ("random", "time", "canonical")
FRACTION_PER = ("user", "dataset")


@dataclass(frozen=True)
class Split:
    train: Interactions
    val: Interactions
    test: Interactions
    cold: Interactions
    cold_items: np.ndarray


def holdout(
    interactions: Interactions,
    keys: np.ndarray,
    fraction: float,
    seed: int,
    purpose: int,
    by: str = "random",
    per: str = "user",
) -> tuple[Interactions, Interactions]:
    """Split off part of every user's interactions (keeping one); returns ``(kept, held_out)``.

    ``keys[u]`` is the stable key of user ``u``; ``purpose`` a tag of
    :mod:`common.data.keys`. ``by`` and ``per``: see the module docstring.
    """
    if by not in SPLITS[:2]:
        raise InputError(f"split: expected 'random' or 'time' here, got {by!r}")
    if by == "time" and interactions.timestamp is None:
        raise InputError("split = 'time' needs timestamps, and this dataset has none")
    if per not in FRACTION_PER:
        raise InputError(f"split-fraction-per: expected one of {FRACTION_PER}, got {per!r}")
    order = canonical_order(interactions)
    users, starts, counts = np.unique(
        interactions.user[order], return_index=True, return_counts=True
    )
    held = np.zeros(len(interactions), dtype=bool)
    for user, start, count in zip(users.tolist(), starts.tolist(), counts.tolist(), strict=True):
        rows = order[start : start + count]
        rng = keyed_generator(seed, purpose, keys[user])
        take = _count_held(count, fraction, per, rng)
        if by == "random":
            chosen = rng.permutation(count)[:take]
        else:
            latest_last = np.lexsort((rng.random(count), interactions.timestamp[rows]))
            chosen = latest_last[count - take :]
        held[rows[chosen]] = True
    return interactions.select(~held), interactions.select(held)


def canonical_order(interactions: Interactions) -> np.ndarray:
    """Row order by user, then item, then timestamp: a user's rows in an order of their own."""
    columns = (interactions.item, interactions.user)
    if interactions.timestamp is not None:
        columns = (interactions.timestamp, *columns)
    return np.lexsort(columns)


def _count_held(count: int, fraction: float, per: str, rng: np.random.Generator) -> int:
    """How many of a user's ``count`` interactions to hold out (always leaving one)."""
    wanted = math.floor(count * fraction) if per == "user" else int(rng.binomial(count, fraction))
    return min(wanted, count - 1)


def make_split(
    dataset: Dataset,
    how: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    cold_fraction: float = 0.0,
    per: str = "user",
) -> Split:
    """``how``: ``"random"``, ``"time"`` or ``"canonical"`` (the source's own split)."""
    if how not in SPLITS:
        raise InputError(
            f"split: expected one of {SPLITS} (MovieLens-100K also 'u1'..'u5', 'ua', 'ub'), "
            f"got {how!r}"
        )
    for key, value in (("val-fraction", val_fraction), ("test-fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise InputError(f"{key}: expected a fraction in [0, 1), got {value}")
    keys = user_keys(dataset.user_ids)
    if how == "canonical":
        if dataset.canonical_split is None:
            raise InputError(
                f"split = 'canonical': dataset {dataset.name!r} was loaded without a "
                "canonical split (MovieLens-100K: set split = 'u1'..'ub'; csv: set test-path)"
            )
        rest, test = dataset.canonical_split
        if dataset.canonical_val is None:
            train, val = holdout(rest, keys, val_fraction, seed, VAL_HOLDOUT, per=per)
        else:
            train, val = rest, dataset.canonical_val
    else:
        if val_fraction + test_fraction >= 1.0:
            raise InputError(
                f"val-fraction + test-fraction: expected less than 1 together, "
                f"got {val_fraction} + {test_fraction}"
            )
        rest, test = holdout(
            dataset.interactions, keys, test_fraction, seed, TEST_HOLDOUT, how, per
        )
        val_share = val_fraction / (1.0 - test_fraction)
        train, val = holdout(rest, keys, val_share, seed, VAL_HOLDOUT, how, per)
    rng = np.random.default_rng([seed, 17])
    cold_items = np.sort(
        rng.choice(dataset.num_items, size=int(dataset.num_items * cold_fraction), replace=False)
    )
    parts = [train, val, test]
    cold = Interactions.concat([p.select(np.isin(p.item, cold_items)) for p in parts])
    train, val, test = (p.select(~np.isin(p.item, cold_items)) for p in parts)
    return Split(train, val, test, cold, cold_items)
