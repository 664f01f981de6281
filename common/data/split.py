"""Train / validation / test splits, per user.

Every user keeps at least one training interaction. Per user with ``n``
interactions, ``floor(n * test_fraction)`` go to test and
``floor(n * val_fraction)`` to validation (fewer if that would leave no
training interaction), chosen at random by seed (``by="random"``) or as the
latest ones (``by="time"``: test is the newest, validation the next newest).
A source's canonical split (MovieLens ``u1``..``ub``, LightGCN) keeps its test
set; validation is then carved from its training set by the same rule.

Cold-start items: with ``cold_fraction > 0`` a random share of the catalogue
(by seed; the choice is public) is held out of all training data. Every
interaction with those items, whichever split it fell in, moves to ``cold``:
the model never sees these items trained, and ``cold`` measures how well it
recommends them from their text alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.data.dataset import Dataset, Interactions
from common.errors import InputError


@dataclass(frozen=True)
class Split:
    train: Interactions
    val: Interactions
    test: Interactions
    cold: Interactions
    cold_items: np.ndarray


def holdout(
    interactions: Interactions,
    fraction: float,
    seed: int,
    by: str = "random",
) -> tuple[Interactions, Interactions]:
    """Split off ``floor(n * fraction)`` interactions of every user (keeping one).

    Returns ``(kept, held_out)``.
    """
    if by not in ("random", "time"):
        raise InputError(f"split: expected 'random' or 'time', got {by!r}")
    if by == "time" and interactions.timestamp is None:
        raise InputError("split = 'time' needs timestamps, and this dataset has none")
    rng = np.random.default_rng(seed)
    tiebreak = rng.random(len(interactions))
    keys = (tiebreak,) if by == "random" else (tiebreak, interactions.timestamp)
    order = np.lexsort((*keys, interactions.user))
    users = interactions.user[order]
    counts = np.bincount(users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank_from_end = starts[users] + counts[users] - 1 - np.arange(len(users))
    take = np.minimum(np.floor(counts * fraction).astype(np.int64), counts - 1)
    held = np.zeros(len(interactions), dtype=bool)
    held[order] = rank_from_end < take[users]
    return interactions.select(~held), interactions.select(held)


def make_split(
    dataset: Dataset,
    how: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    cold_fraction: float = 0.0,
) -> Split:
    """``how``: ``"random"``, ``"time"`` or ``"canonical"`` (the source's own split)."""
    for key, value in (("val-fraction", val_fraction), ("test-fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise InputError(f"{key}: expected a fraction in [0, 1), got {value}")
    if how == "canonical":
        if dataset.canonical_split is None:
            raise InputError(
                f"split = 'canonical': dataset {dataset.name!r} was loaded without a "
                "canonical split (for MovieLens-100K set split = 'u1'..'ub')"
            )
        rest, test = dataset.canonical_split
        train, val = holdout(rest, val_fraction, seed)
    else:
        rest, test = holdout(dataset.interactions, test_fraction, seed, by=how)
        train, val = holdout(rest, val_fraction / (1.0 - test_fraction), seed + 1, by=how)
    rng = np.random.default_rng([seed, 17])
    cold_items = np.sort(
        rng.choice(dataset.num_items, size=int(dataset.num_items * cold_fraction), replace=False)
    )
    parts = [train, val, test]
    cold = Interactions.concat([p.select(np.isin(p.item, cold_items)) for p in parts])
    train, val, test = (p.select(~np.isin(p.item, cold_items)) for p in parts)
    return Split(train, val, test, cold, cold_items)
