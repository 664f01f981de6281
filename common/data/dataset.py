"""In-memory types every loader returns and every other module consumes.

Users and items are re-indexed to ``0..n-1`` at load time; the original ids are
kept (``Dataset.user_ids``, ``Catalogue.item_ids``) so that output can be mapped
back. The catalogue is public and identical at every site; everything else in a
:class:`Dataset` is private to the site that holds the user.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

REFERENCE_SCALE = (1.0, 5.0)
"""Models see every rating mapped linearly from the public scale onto 1..5, the scale
their settings were validated on (MovieLens), and predictions are mapped back: bounds,
shrinkages, learning rates and DP noise then mean the same on a 1..10 or 1..100 scale."""
MAX_EDGE_TYPES = 10
"""A scale of at most this many levels gives the GCN one edge type per level; a wider
one, one edge type weighted by the rating (``common.model``)."""


@dataclass(frozen=True)
class Catalogue:
    """The public item catalogue and the public schema of the data.

    Attributes:
        item_ids: original item id of each item index.
        item_text: one text per item (title, year, genres ...) or ``None``.
        rating_levels: the public rating scale in increasing order, e.g.
            ``(1.0, 2.0, 3.0, 4.0, 5.0)``; ``(1.0,)`` for implicit feedback.
        user_feature_names: names of the columns of ``Dataset.user_features``.
        derived_from_data: what of the above a loader took from the interactions
            because no public source gave it, e.g. ``("item ids", "rating scale")``;
            empty when all of it is public. Not part of :meth:`fingerprint`: it
            records where the content came from, and the run refuses it under DP
            (``common.data.load_dataset``).
    """

    item_ids: tuple[str, ...]
    item_text: tuple[str, ...] | None
    rating_levels: tuple[float, ...]
    user_feature_names: tuple[str, ...] = ()
    derived_from_data: tuple[str, ...] = ()

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def implicit(self) -> bool:
        """True when every interaction is a plain "user touched item" event."""
        return len(self.rating_levels) == 1

    @property
    def edge_types(self) -> int:
        """The GCN's edge types: one per rating level, or, beyond :data:`MAX_EDGE_TYPES`
        levels, two (a plain edge and one weighted by the rating)."""
        levels = len(self.rating_levels)
        return levels if levels <= MAX_EDGE_TYPES else 2

    def to_reference_scale(self, ratings: np.ndarray) -> np.ndarray:
        """``ratings`` mapped linearly from the public scale onto :data:`REFERENCE_SCALE`
        (a one-level scale is only shifted onto its start)."""
        low, unit = self._scale()
        return REFERENCE_SCALE[0] + (np.asarray(ratings) - low) / unit

    def from_reference_scale(self, values: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_reference_scale`, for predictions."""
        low, unit = self._scale()
        return low + (values - REFERENCE_SCALE[0]) * unit

    def limited(self, ratings: np.ndarray) -> np.ndarray:
        """Predicted ``ratings`` limited to the public scale (the lowest and highest level)."""
        return np.clip(ratings, self.rating_levels[0], self.rating_levels[-1])

    @property
    def reference_unit(self) -> float:
        """One step of :data:`REFERENCE_SCALE` on the public scale."""
        return self._scale()[1]

    def _scale(self) -> tuple[float, float]:
        low, high = self.rating_levels[0], self.rating_levels[-1]
        return low, ((high - low) / (REFERENCE_SCALE[1] - REFERENCE_SCALE[0])) or 1.0

    def fingerprint(self) -> str:
        """SHA-256 of the catalogue's content: sites check they share the server's catalogue."""
        content = [self.item_ids, self.item_text, self.rating_levels, self.user_feature_names]
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()


@dataclass(frozen=True)
class Interactions:
    """Parallel arrays of (user, item, rating, timestamp), one entry per interaction.

    ``rating`` is 1.0 for implicit feedback; ``timestamp`` is ``None`` when the
    source has no times (seconds since the epoch otherwise).
    """

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.user)
        lengths = {len(self.item), len(self.rating)}
        if self.timestamp is not None:
            lengths.add(len(self.timestamp))
        if lengths != {n}:
            raise ValueError(f"Interactions arrays differ in length: {n} and {lengths}")

    def __len__(self) -> int:
        return len(self.user)

    def select(self, mask_or_index: np.ndarray) -> Interactions:
        """The interactions picked by a boolean mask or an index array."""
        return Interactions(
            user=self.user[mask_or_index],
            item=self.item[mask_or_index],
            rating=self.rating[mask_or_index],
            timestamp=None if self.timestamp is None else self.timestamp[mask_or_index],
        )

    @staticmethod
    def empty() -> Interactions:
        return Interactions(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))

    @staticmethod
    def concat(parts: list[Interactions]) -> Interactions:
        has_time = all(p.timestamp is not None for p in parts)
        return Interactions(
            user=np.concatenate([p.user for p in parts]),
            item=np.concatenate([p.item for p in parts]),
            rating=np.concatenate([p.rating for p in parts]),
            timestamp=np.concatenate([p.timestamp for p in parts]) if has_time else None,
        )


@dataclass(frozen=True)
class Dataset:
    """One dataset as loaded from disk or generated.

    Attributes:
        name: short name, e.g. ``"ml-100k"``.
        catalogue: the public catalogue (see :class:`Catalogue`).
        user_ids: original user id of each user index.
        interactions: every interaction (int64 user/item, float32 rating).
        user_features: float32 ``[num_users, len(catalogue.user_feature_names)]``;
            shape ``[num_users, 0]`` when the source has no user attributes.
        user_columns: raw categorical user columns usable for non-IID
            partitioning, e.g. ``{"occupation": array([...])}``.
        canonical_split: the source's own (train, test) split when the source
            defines one (MovieLens ``u1``..``u5``, ``ua``, ``ub``; LightGCN
            ``train.txt``/``test.txt``; the ``csv`` loader's ``data-path`` and
            ``test-path``), else ``None``.
        canonical_val: the source's own validation set (the ``csv`` loader's
            ``val-path``), apart from both parts of ``canonical_split``; ``None``
            when validation is to be carved from the canonical training set.
    """

    name: str
    catalogue: Catalogue
    user_ids: tuple[str, ...]
    interactions: Interactions
    user_features: np.ndarray
    user_columns: dict[str, np.ndarray] = field(default_factory=dict)
    canonical_split: tuple[Interactions, Interactions] | None = None
    canonical_val: Interactions | None = None

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return self.catalogue.num_items
