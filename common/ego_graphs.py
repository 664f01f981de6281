"""Users' ego graphs as fixed-size samples: the unit of privacy is one row here.

A sample is one user with that user's own interactions, at most ``degree_cap``
of them (a uniform subsample without replacement when the user has more), padded
to exactly ``degree_cap`` so that no tensor shape depends on other users. All
randomness of a sample (the subsample, the ranking negatives) comes from a
generator seeded by ``(seed, epoch, user key)``: the user key is a stable hash
of the user's original id (``common.data.keys``), so a user's sample does not
change when other users are added to or removed from the site. Negatives are
drawn uniformly from the public catalogue.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from common.data.dataset import Catalogue, Interactions
from common.graph.features import GraphFeatures
from common.model import EgoBatch

EVALUATION_EPOCH = 2**31 - 1
"""Epoch key of the fixed subsample used to build a user's context at evaluation."""


class UserEgoGraphs(Dataset):
    """One sample per user: the fields of :class:`EgoBatch`.

    Args:
        interactions: the users' training interactions; ``user`` holds local
            indices ``0..num_users-1``.
        user_keys: ``[num_users]`` stable key of each user (``common.data.keys``), seeds
            its randomness.
        user_features: ``[num_users, F]`` float32 attributes.
        catalogue: the public catalogue (number of items, rating scale).
        degree_cap: K, the number of edges per sample.
        edge_dropout: probability that a training edge is left out of the ego
            graph (it stays a target); 0 at evaluation.
        seed: base seed of the per-user generators.
        features: the released item graph's features of the site's users (the learned
            model on the item graph), added to every sample; ``None`` without.
        negatives_from: the items ranking negatives are drawn from, uniformly (the items
            the released graph says someone touched); ``None``: the whole catalogue.
    """

    def __init__(
        self,
        interactions: Interactions,
        user_keys: np.ndarray,
        user_features: np.ndarray,
        catalogue: Catalogue,
        degree_cap: int,
        edge_dropout: float,
        seed: int,
        features: GraphFeatures | None = None,
        negatives_from: np.ndarray | None = None,
    ) -> None:
        num_users = len(user_keys)
        order = np.argsort(interactions.user, kind="stable")
        counts = np.bincount(interactions.user, minlength=num_users)
        self.indptr = np.concatenate([[0], np.cumsum(counts)])
        self.items = interactions.item[order].astype(np.int64)
        ratings = interactions.rating[order]
        self.ratings = catalogue.to_reference_scale(ratings).astype(np.float32)
        self.levels = (
            np.searchsorted(catalogue.rating_levels, ratings).astype(np.int64)
            if catalogue.edge_types == len(catalogue.rating_levels)
            else np.zeros(len(ratings), np.int64)  # one weighted edge type (common.model)
        )
        self.user_keys = np.asarray(user_keys, dtype=np.int64)
        self.user_features = torch.as_tensor(user_features, dtype=torch.float32)
        self.num_items = catalogue.num_items
        self.catalogue = catalogue
        self.degree_cap = degree_cap
        self.edge_dropout = edge_dropout
        self.seed = seed
        self.features = features
        self.negatives_from = negatives_from
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.user_keys)

    def set_epoch(self, epoch: int) -> None:
        """Draw fresh subsamples and negatives (same epoch, same draws)."""
        self.epoch = epoch

    def degree(self, user: int) -> int:
        return int(self.indptr[user + 1] - self.indptr[user])

    def item_set(self, user: int) -> np.ndarray:
        """Every item of the user (not capped)."""
        return self.items[self.indptr[user] : self.indptr[user + 1]]

    def samples(self, users: list[int] | np.ndarray, epoch: int) -> list[tuple[torch.Tensor, ...]]:
        """The samples of ``users`` in ``epoch`` (the tuple order of :class:`EgoBatch`); the
        released graph's features of their training targets computed for all of them at
        once, each user's from that user's own row alone (``GraphFeatures.of_targets``)."""
        columns = [self._columns(int(user), epoch) for user in users]
        samples = [
            [torch.from_numpy(c) for c in user_columns]
            + [self.user_features[user], torch.tensor(int(user))]
            for user, user_columns in zip(users, columns, strict=True)
        ]
        if self.features is not None and samples:  # the training targets' (an evaluation has none)
            items, _, ratings, _, _, negatives = (np.stack(c) for c in zip(*columns, strict=True))
            if epoch == EVALUATION_EPOCH:
                graph = (np.zeros((*items.shape, self.features.count)),) * 2
            else:
                graph = self.features.of_targets(np.asarray(users), items, ratings, negatives)
            for k, sample in enumerate(samples):
                sample += [torch.from_numpy(part[k].astype(np.float32)) for part in graph]
        return [tuple(sample) for sample in samples]

    def _columns(self, user: int, epoch: int) -> list[np.ndarray]:
        """User ``user``'s ``items, levels, ratings, mask, context, negatives`` in ``epoch``."""
        rng = np.random.default_rng((self.seed, epoch, int(self.user_keys[user])))
        start, end = self.indptr[user], self.indptr[user + 1]
        k = self.degree_cap
        edges = np.arange(start, end)
        if len(edges) > k:
            edges = rng.choice(edges, size=k, replace=False)
        n = len(edges)
        items = np.zeros(k, dtype=np.int64)
        levels = np.zeros(k, dtype=np.int64)
        ratings = np.zeros(k, dtype=np.float32)
        mask = np.zeros(k, dtype=np.float32)
        items[:n], levels[:n], ratings[:n], mask[:n] = (
            self.items[edges],
            self.levels[edges],
            self.ratings[edges],
            1.0,
        )
        if self.negatives_from is None:
            negatives = rng.integers(0, self.num_items, size=k)
        else:
            negatives = self.negatives_from[rng.integers(0, len(self.negatives_from), size=k)]
        context = mask.copy()
        if epoch != EVALUATION_EPOCH and self.edge_dropout > 0:
            context *= rng.random(k) >= self.edge_dropout
        return [items, levels, ratings, mask, context, negatives]

    def __getitem__(self, user: int) -> tuple[torch.Tensor, ...]:
        return self.samples([user], self.epoch)[0]

    def __getitems__(self, users: list[int]) -> list[tuple[torch.Tensor, ...]]:
        """A batch's samples, as a ``DataLoader`` fetches them: the graph's features in one
        computation (:meth:`samples`)."""
        return self.samples(users, self.epoch)

    def context(self, users: np.ndarray) -> EgoBatch:
        """The evaluation context of ``users``: a fixed subsample, same for every call."""
        columns = zip(*self.samples(users, EVALUATION_EPOCH), strict=True)
        return EgoBatch(*(torch.stack(c) for c in columns))
