r"""The released graph's score, part by part: the features of the learned model.

``common.graph.release`` releases the graph; here it is split into the parts
:math:`\phi_{ui}` whose sum is its score, so that the learned model
(``common.model``) can weigh them, :math:`\theta^\top \phi_{ui}`, and add a
correction that starts at zero.
"""

from __future__ import annotations

import numpy as np

from common.data.dataset import Interactions
from common.data.site import SiteData
from common.graph.filters import neighbourhood_residuals, residual_rows, user_rows
from common.graph.release import (
    ItemGraph,
    RatingNeighbourhood,
    on_reference_scale,
    shrunk_user_means,
)

FEATURE_NAMES = {
    "ranking": ("linear", "low-pass"),
    "rating": ("user mean", "item offset", "neighbourhood"),
}
"""The parts of the released graph's score of a user and an item, in :class:`GraphFeatures`'
order; the graph's score is their sum."""


class GraphFeatures:
    r"""What the released graph says about a site's users, part by part
    (:data:`FEATURE_NAMES`): the features :math:`\phi_{ui}` of the learned model, whose
    score is :math:`\theta^\top \phi_{ui}` plus a learned correction
    (``common.model``); :math:`\theta = 1` is the graph's own score.

    Ranking: the filter's linear and low-pass parts of :math:`s_u` (``ItemFilter``).
    Rating: the user's shrunk mean :math:`m_u`, the item's offset :math:`b_i` and the
    neighbourhood's residual :math:`\hat e_{ui}` (0 before round 2), on the reference
    scale. A user's features are a function of that user's own training row and of the
    released graph alone.

    Training targets are the user's own training items, so their features leave the
    target out of the user's row (ranking: the row minus the item, the paired negative
    scored from the same row; rating: the mean without the rating): the model is
    trained on what it will see for an item the user has not rated yet.
    """

    def __init__(self, graph: ItemGraph, site: SiteData, settings: RatingNeighbourhood) -> None:
        self.graph = graph
        self.settings = settings
        self.catalogue = site.catalogue
        self.num_items = site.catalogue.num_items
        self.rows = user_rows(site.train, site.num_users, self.num_items)
        self.ranking = graph.item_bias is None
        if self.ranking:
            if graph.complete:
                self.filter = graph.item_filter(self.num_items)
            return
        train = on_reference_scale(site)
        self.counts = np.bincount(train.user, minlength=site.num_users).astype(np.float64)
        self.means = shrunk_user_means(
            train, site.num_users, graph.item_bias, settings, graph.global_mean
        )
        self.residuals = residual_rows(
            train, site.num_users, self.num_items, self.means, graph.item_bias
        )

    @property
    def count(self) -> int:
        return len(FEATURE_NAMES["ranking" if self.ranking else "rating"])

    def of_pairs(
        self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray | None = None
    ) -> np.ndarray:
        """``[P, F]`` for the pairs ``(users[p], items[p])``; with ``ratings`` (the
        reference-scale training ratings of the pairs) each pair is left out of its
        user's row."""
        if self.ranking:
            features = self.filter.features(self.rows[users], items[:, None])[:, 0]
            if ratings is None:
                return features
            return features - self.filter.item_features(items, items[:, None])[:, 0]
        means = self.means[users]
        if ratings is not None:
            shrinkage = self.settings.user_shrinkage
            total = means * (self.counts[users] + shrinkage)
            left = ratings - self.graph.item_bias[items]
            means = (total - left) / (self.counts[users] - 1 + shrinkage)
        neighbourhood = np.zeros(len(users))
        if self.graph.similarity is not None:
            neighbourhood = neighbourhood_residuals(
                self.graph.similarity,
                self.residuals,
                users,
                items,
                self.settings.neighbours,
                self.settings.damping,
            )
        return np.stack([means, self.graph.item_bias[items], neighbourhood], 1)

    def of_targets(
        self, user: int, items: np.ndarray, ratings: np.ndarray, negatives: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """A training sample's features: ``[K, F]`` of the user's target ``items`` (each
        left out, ``ratings`` on the reference scale) and ``[K, F]`` of the ``negatives``
        paired with them (ranking; zeros for rating)."""
        users = np.full(len(items), user)
        if not self.ranking:
            return self.of_pairs(users, items, ratings), np.zeros((len(items), self.count))
        candidates = np.stack([items, negatives], 1)  # [K, 2]
        row = self.filter.features(self.rows[[user]], candidates.reshape(1, -1))
        left = self.filter.item_features(items, candidates)  # [K, 2, F]
        features = row.reshape(len(items), 2, self.count) - left
        return features[:, 0], features[:, 1]

    def of_catalogue(self, users: np.ndarray) -> np.ndarray:
        """Ranking: ``[B, num_items, F]`` for every catalogue item."""
        return self.filter.catalogue_features(self.rows[users])

    def scores(self, users: np.ndarray) -> np.ndarray:
        """Ranking: the graph's own scores ``[len(users), num_items]`` of the site's
        ``users`` (items the graph does not cover score minus infinity); the released
        degrees (MostPop) for a user without training rows, whose filter row is empty,
        and for everyone after round 1 alone (the run's baseline)."""
        popularity = np.broadcast_to(self.graph.degrees, (len(users), self.num_items))
        if not self.graph.complete:
            return popularity.astype(np.float32)
        rows = self.rows[users]
        scores = self.filter.scores(rows)
        new = rows.getnnz(axis=1) == 0
        scores[new] = popularity[new]
        return scores

    def predict(self, pairs: Interactions) -> np.ndarray:
        """Rating: the graph's own prediction for each of the site's ``(user, item)``
        ``pairs``, on the public scale: the user's mean and the item's offset (after round
        1 alone, the run's baseline), plus, once round 2 is released, the neighbourhood's
        residual (the sum of the features)."""
        return self.catalogue.from_reference_scale(self.of_pairs(pairs.user, pairs.item).sum(1))
