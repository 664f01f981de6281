r"""The released graph's score, part by part: the features of the learned model.

``common.graph.release`` releases the graph; here it is split into the parts
:math:`\phi_{ui}` whose sum is its score, so that the learned model
(``common.model``) can weigh them, :math:`\theta^\top \phi_{ui}`, and add a
correction that starts at zero.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from common.data.dataset import Interactions
from common.data.site import SiteData
from common.graph.filters import (
    ItemFilter,
    Matrix,
    bounded_rows,
    cosine_block,
    item_offsets,
    mean_popularity,
    neighbour_mean,
    neighbourhood_residuals,
    offset_prior,
    offset_prior_terms,
    offset_weights,
    residual_rows,
    user_rows,
)
from common.graph.release import (
    ItemGraph,
    RatingNeighbourhood,
    on_reference_scale,
    shrunk_user_means,
)

FEATURE_NAMES = {
    "ranking": ("linear", "low-pass", "text neighbours"),
    "rating": ("user mean", "item offset", "neighbourhood", "text neighbourhood"),
}
"""The parts of the released graph's score of a user and an item, in :class:`GraphFeatures`'
order; the graph's score is their sum."""

TEXT_FEATURE = {
    "ranking": FEATURE_NAMES["ranking"].index("text neighbours"),
    "rating": FEATURE_NAMES["rating"].index("text neighbourhood"),
}
"""Where each task's item text part is in :data:`FEATURE_NAMES`."""

TARGET_USERS = 64
"""How many users' training targets :meth:`GraphFeatures.of_targets` computes at once: on
Gowalla a user's 2 x 64 candidates gather ``[128, 512]`` of the filter's basis."""

TEXT_NEIGHBOURS = 100
"""How many nearest neighbours by item text an item keeps (:func:`text_neighbours`): 100 of
5, 10, 20, 50, 100, 200, 400 and all, by validation NDCG@20 of ranking MovieLens-100K
items held out of training among themselves (a tenth of the warm items, drawn apart from
the test's cold items; the README's *Cold-start items*)."""


def text_neighbours(text: np.ndarray, count: int = TEXT_NEIGHBOURS) -> sp.csr_matrix:
    r"""``[n, n]``: row :math:`i` holds the cosine similarities of item :math:`i`'s
    ``count`` nearest neighbours by (unit-length) text vector, itself excluded: a public
    item-item graph, computed from the public catalogue alone, 1,024 rows at a time."""
    n = len(text)
    count = min(count, n - 1)
    blocks = []
    for start in range(0, n, 1024):
        similarity = text[start : start + 1024] @ text.T
        rows = np.arange(len(similarity))
        similarity[rows, rows + start] = -np.inf
        top = np.argpartition(-similarity, count - 1, axis=1)[:, :count]
        values = np.take_along_axis(similarity, top, axis=1)
        blocks.append(
            sp.csr_matrix(
                (values.ravel(), (np.repeat(rows, count), top.ravel())), shape=(len(rows), n)
            )
        )
    return sp.vstack(blocks).tocsr() if blocks else sp.csr_matrix((0, 0))


def covered_text_sums(text: sp.csr_matrix, rows: Matrix, covered: np.ndarray) -> np.ndarray:
    r"""``[B, m]``: :math:`\sum_{j \in N(u)} T_{ij}` of users' ``rows`` at the ``covered``
    items, over the text-neighbour graph ``text``."""
    sums = rows @ text[covered].T
    return sums.toarray() if sp.issparse(sums) else np.asarray(sums)


def text_scale(covered_scores: np.ndarray, text_sums: np.ndarray, weight: float) -> np.ndarray:
    r"""``[B]``: :math:`c_u = \gamma \, \sigma_S(s_u) / \sigma_S(r_u T^\top)`, the text
    part's scale (``GraphFeatures``), from users' filter scores ``[B, m]`` and text sums
    ``[B, m]`` at the covered items (0 where the text part does not vary)."""
    spread = text_sums.std(1)
    graph = covered_scores.std(1)
    return np.divide(weight * graph, spread, out=np.zeros(len(graph)), where=spread > 0)


def text_scales(
    item_filter: ItemFilter, text: sp.csr_matrix, rows: Matrix, weight: float
) -> np.ndarray:
    """``[B]`` :func:`text_scale` of users' ``rows``, 1,024 users at a time."""
    scales = np.zeros(rows.shape[0])
    covered = item_filter.items
    for start in range(0, len(scales), 1024):
        batch = rows[start : start + 1024]
        scores = item_filter.scores(batch)[:, covered]
        scales[start : start + len(scores)] = text_scale(
            scores, covered_text_sums(text, batch, covered), weight
        )
    return scales


_TEXT_GRAPHS: dict[bytes, sp.csr_matrix] = {}


def _text_graph(text: np.ndarray) -> sp.csr_matrix:
    """:func:`text_neighbours` of ``text``, computed once per process and catalogue: a site
    builds its features every round, with the same public texts."""
    key = hashlib.blake2b(text.tobytes(), digest_size=16).digest()
    if key not in _TEXT_GRAPHS:
        _TEXT_GRAPHS.clear()  # one catalogue at a time
        _TEXT_GRAPHS[key] = text_neighbours(text)
    return _TEXT_GRAPHS[key]


@dataclass(frozen=True)
class SentRows:
    """Rating: what a site's users sent, from which a training rating is taken back out.

    Attributes:
        first_means, first_weights: round 1's means :math:`m^{(1)}_u` and weights
            :math:`w_u` (``common.graph.filters.offset_weights``).
        residuals, binary: round 2's bounded residual rows :math:`x_u` and, with co-rating
            weights, bounded binary rows (None without).
    """

    first_means: np.ndarray
    first_weights: np.ndarray
    residuals: sp.csr_matrix
    binary: sp.csr_matrix | None


class GraphFeatures:
    r"""What the released graph says about a site's users, part by part
    (:data:`FEATURE_NAMES`): the features :math:`\phi_{ui}` of the learned model, whose
    score is :math:`\theta^\top \phi_{ui}` plus a learned correction
    (``common.model``); :math:`\theta = 1` is the graph's own score.

    Ranking: the filter's linear and low-pass parts of :math:`s_u` (``ItemFilter``), and
    the item text's part :math:`c_u \sum_{j \in N(u)} T_{ij}` over the text-neighbour
    graph :math:`T` (:func:`text_neighbours`; 0 without item text), scaled to the
    spread of the filter's score for the user and weighted by the released
    :math:`\gamma` (``ItemGraph.text_weight``):

    .. math::
        c_u = \gamma \, \sigma_S(s_u) / \sigma_S(r_u T^\top),

    :math:`\sigma_S` the standard deviation over the items :math:`S` the filter covers,
    both from the user's whole training row (0 where the text part does not vary). The
    text is public, so this part costs no budget; it is also the score of an item the
    graph has never seen.
    Rating: the user's shrunk mean :math:`m_u`, the item's offset :math:`b_i`, the
    neighbourhood's residual :math:`\hat e_{ui}` (0 before round 2) and the text
    neighbourhood's, :math:`\gamma \hat t_{ui}`: the same mean of the user's own
    residuals, weighted by :math:`T` instead of the released covariance (public, so
    free of budget; 0 before round 2 and without item text), on the reference scale. A
    user's features are a function of that user's own training row and of the
    released graph alone.

    Training targets are the user's own training items, so their features leave the
    target out of the user's row (ranking: the row minus the item, the paired negative
    scored from the same row): the model is trained on what it will see for an item the
    user has not rated yet. A rating is also taken back out of the release, through the
    rows the site itself sent: the mean without it, the item's offset without the site's
    term :math:`w_u (r_{ui} - m^{(1)}_u)` of round 1 (its prior fitted again
    without it), and the neighbourhood's similarities
    without the user's terms :math:`x_{ui} x_{uj}` of round 2's covariance (in-sample,
    the release leaks the rating, and weights learned on it fit the leak).
    """

    def __init__(
        self,
        graph: ItemGraph,
        site: SiteData,
        settings: RatingNeighbourhood,
        text: np.ndarray | None = None,
    ) -> None:
        self.graph = graph
        self.settings = settings
        self.catalogue = site.catalogue
        self.num_items = site.catalogue.num_items
        self.rows = user_rows(site.train, site.num_users, self.num_items)
        self.ranking = graph.item_bias is None
        self.text = None if text is None else _text_graph(text)
        if self.ranking:
            if graph.complete:
                self.filter = graph.item_filter
            return
        self.train = train = on_reference_scale(site)
        self.counts = np.bincount(train.user, minlength=site.num_users).astype(np.float64)
        self.means = shrunk_user_means(
            train, site.num_users, graph.item_bias, settings, graph.global_mean
        )
        self.residuals = residual_rows(
            train, site.num_users, self.num_items, self.means, graph.item_bias
        )

    @cached_property
    def sent(self) -> SentRows:
        """Rating: what the site's users sent in rounds 1 and 2 (computed once, for the
        training targets only)."""
        settings, num_users = self.settings, len(self.counts)
        first_means = shrunk_user_means(self.train, num_users, np.zeros(self.num_items), settings)
        return SentRows(
            first_means,
            offset_weights(self.train, num_users, first_means, settings.bound),
            bounded_rows(self.residuals, settings.exponent, settings.bound),
            None
            if self.graph.co_counts is None
            else bounded_rows(self.rows, settings.exponent, settings.bound),
        )

    @cached_property
    def released_prior_terms(self) -> np.ndarray:
        """Rating: the offsets' prior's summed terms over round 1's release
        (``offset_prior_terms``)."""
        graph = self.graph
        return offset_prior_terms(
            graph.item_sums, graph.degrees, graph.degree_noise, graph.item_covariates
        ).sum(0)

    @property
    def count(self) -> int:
        return len(FEATURE_NAMES["ranking" if self.ranking else "rating"])

    def of_pairs(
        self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray | None = None
    ) -> np.ndarray:
        """``[P, F]`` for the pairs ``(users[p], items[p])``; with ``ratings`` (rating: the
        reference-scale training ratings of the pairs) each rating is left out of its
        user's row and out of the release (the class docstring; ranking leaves a training
        target out in :meth:`of_targets`)."""
        if self.ranking:
            features = self.filter.features(self.rows[users], items[:, None])[:, 0]
            text = self._text_sums(users, items)  # T_ii = 0: the item is out of its own sum
            return np.concatenate([features, text[:, None]], 1)
        means = self.means[users]
        offsets = self.graph.item_bias[items]
        if ratings is None:
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
            text = self._text_neighbourhood(users, items, np.zeros(len(users)))
            return np.stack([means, offsets, neighbourhood, text], 1)
        shrinkage = self.settings.user_shrinkage
        total = means * (self.counts[users] + shrinkage)
        left_means = (total - (ratings - offsets)) / (self.counts[users] - 1 + shrinkage)
        weight = self.sent.first_weights[users]
        sent = weight * (ratings - self.sent.first_means[users])
        graph = self.graph
        sums, counts = graph.item_sums[items], graph.degrees[items]
        left_sums, left_counts = sums - sent, counts - weight
        prior, covariates = graph.item_prior, graph.item_covariates
        unrated = graph.item_unrated_popularity
        if covariates is not None:
            covariates = covariates[items]
        if prior is not None:  # fitted again without the rating's term
            noise = graph.degree_noise
            terms = (
                self.released_prior_terms
                - offset_prior_terms(sums, counts, noise, covariates)
                + offset_prior_terms(left_sums, left_counts, noise, covariates)
            )
            prior = offset_prior(terms)
            if unrated is not None:
                unrated = mean_popularity(terms)
        shrinkages = graph.item_shrinkage, graph.item_noise_shrinkage
        left_offsets = item_offsets(left_sums, left_counts, *shrinkages, prior, covariates, unrated)
        neighbourhood = np.zeros(len(users))
        if self.graph.covariance is not None:
            for user in np.unique(users):
                pairs = np.flatnonzero(users == user)
                neighbourhood[pairs] = self._left_out_neighbourhood(
                    user, items[pairs], means[pairs] - left_means[pairs]
                )
        text = self._text_neighbourhood(users, items, means - left_means)
        return np.stack([left_means, left_offsets, neighbourhood, text], 1)

    def _left_out_neighbourhood(
        self, user: int, items: np.ndarray, mean_shifts: np.ndarray
    ) -> np.ndarray:
        r"""The neighbourhood's residual of the user's training ``items`` as if each had not
        been rated: its similarity to the user's other items computed from the released
        covariance (and co-rating weights) less the user's own terms of that rating,
        :math:`C_{ij} - x_{ui} x_{uj}` with :math:`x_u` the row the site sent in round 2,
        and the user's residuals against the mean without it (``mean_shifts``)."""
        graph, sent = self.graph, self.sent
        start, end = self.residuals.indptr[user], self.residuals.indptr[user + 1]
        rated, values = self.residuals.indices[start:end], self.residuals.data[start:end]
        position = {item: k for k, item in enumerate(rated)}
        target = np.array([position.get(item, -1) for item in items])
        own = target >= 0

        def without_target(
            released: np.ndarray, rows: sp.csr_matrix
        ) -> tuple[np.ndarray, np.ndarray]:
            row = rows.data[rows.indptr[user] : rows.indptr[user + 1]]
            mine = np.where(own, row[target], 0.0)
            return released[np.ix_(items, rated)] - mine[:, None] * row[None, :], mine

        covariance, mine = without_target(graph.covariance, sent.residuals)
        co_counts = None if sent.binary is None else without_target(graph.co_counts, sent.binary)[0]
        weights = cosine_block(
            covariance,
            graph.covariance[items, items] - mine**2,
            np.diag(graph.covariance)[rated],
            co_counts,
            graph.co_count_shrinkage,
            graph.diagonal_floor,
        )
        weights[rated[None, :] == items[:, None]] = 0.0
        shifted = values[None, :] + mean_shifts[:, None]
        return neighbour_mean(weights, shifted, self.settings.neighbours, self.settings.damping)

    def _text_neighbourhood(
        self, users: np.ndarray, items: np.ndarray, mean_shifts: np.ndarray
    ) -> np.ndarray:
        r"""Rating: :math:`\gamma \hat t_{ui}` of each pair, the mean of the user's own
        residuals (shifted by ``mean_shifts``, a training rating's mean without it) on the
        rated items most similar to the item by text (``T_ii = 0``: an item is not its own
        neighbour); 0 before round 2 and without item text."""
        weight, settings = self.graph.text_weight, self.settings
        if self.text is None or not weight or not self.graph.complete:
            return np.zeros(len(users))
        return weight * neighbourhood_residuals(
            self.text,
            self.residuals,
            users,
            items,
            settings.text_neighbours,
            settings.text_damping,
            mean_shifts,
        )

    def of_targets(
        self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray, negatives: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Training samples' features: ``[B, K, F]`` of each user's ``[B, K]`` target
        ``items`` (each left out, ``ratings`` on the reference scale) and ``[B, K, F]`` of
        the ``negatives`` paired with them (ranking; zeros for rating).

        Many users at once, :data:`TARGET_USERS` at a time, and each user's features are
        what that user alone gives, bit for bit: every step is row by row (sparse
        products, gathers, and sums over one user's own row or one pair's vectors), so
        no user's value depends on who else is in the batch."""
        if not self.ranking:
            shape = items.shape
            pairs = self.of_pairs(
                np.repeat(users, shape[1]), items.ravel(), ratings.ravel()
            ).reshape(*shape, self.count)
            return pairs, np.zeros_like(pairs)
        parts = [
            self._ranking_targets(
                users[start : start + TARGET_USERS],
                items[start : start + TARGET_USERS],
                negatives[start : start + TARGET_USERS],
            )
            for start in range(0, len(users), TARGET_USERS)
        ]
        features = np.concatenate(parts)
        return features[:, :, 0], features[:, :, 1]

    def _ranking_targets(
        self, users: np.ndarray, items: np.ndarray, negatives: np.ndarray
    ) -> np.ndarray:
        """``[B, K, 2, F]``: :meth:`of_targets`' features of ``users``' targets (``[..., 0,
        :]``) and negatives (``[..., 1, :]``), each from the user's row less the target."""
        num_users, targets = items.shape
        candidates = np.stack([items, negatives], -1)  # [B, K, 2]
        rows = self.rows[users]
        weights = np.repeat(self.filter.low_pass_weights(rows, left_out=1), targets)
        left = self.filter.item_features(items.ravel(), candidates.reshape(-1, 2), weights)
        row = self.filter.features(rows, candidates.reshape(num_users, -1), left_out=1)
        features = (row.reshape(-1, 2, 2) - left).reshape(num_users, targets, 2, 2)
        text = self._text_sums(np.repeat(users, 2 * targets), candidates.ravel())
        text = text.reshape(num_users, targets, 2)
        if self.text is not None:  # the target out of the row: T_ii = 0, T_ji for its negative
            paired = np.asarray(self.text[negatives.ravel(), items.ravel()])
            text[..., 1] -= self.text_scales[users, None] * paired.reshape(num_users, targets)
        return np.concatenate([features, text[..., None]], -1)

    def of_catalogue(self, users: np.ndarray) -> np.ndarray:
        """Ranking: ``[B, num_items, F]`` float32 for every catalogue item (filled in place:
        on Gowalla a batch is 256 x 41k x 3)."""
        features = np.zeros((len(users), self.num_items, self.count), np.float32)
        self.filter.catalogue_features(self.rows[users], features)
        if self.text is not None:
            text = (self.rows[users] @ self.text.T).toarray()
            features[..., TEXT_FEATURE["ranking"]] = self.text_scales[users, None] * text
        return features

    def _text_sums(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """The text part ``c_u sum_{j in N(u)} T_ij`` of each pair ``(users[p], items[p])``
        (0 without text)."""
        if self.text is None:
            return np.zeros(len(users))
        sums = np.asarray(self.rows[users].multiply(self.text[items]).sum(1)).ravel()
        return self.text_scales[users] * sums

    @cached_property
    def text_scales(self) -> np.ndarray:
        """``[num_users]`` :math:`c_u` (the class docstring)."""
        if self.text is None or not self.graph.text_weight:
            return np.zeros(self.rows.shape[0])
        return text_scales(self.filter, self.text, self.rows, self.graph.text_weight)

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
        if self.text is not None and self.graph.text_weight:
            covered = self.filter.items  # c_u from these scores, not computed again
            text = covered_text_sums(self.text, rows, covered)
            scale = text_scale(scores[:, covered], text, self.graph.text_weight)
            scores[:, covered] += (scale[:, None] * text).astype(np.float32)
        new = rows.getnnz(axis=1) == 0
        scores[new] = popularity[new]
        return scores

    def predict(self, pairs: Interactions) -> np.ndarray:
        """Rating: the graph's own prediction for each of the site's ``(user, item)``
        ``pairs``, on the public scale: the user's mean and the item's offset (after round
        1 alone, the run's baseline), plus, once round 2 is released, the neighbourhood's
        residual (the sum of the features)."""
        return self.catalogue.from_reference_scale(self.of_pairs(pairs.user, pairs.item).sum(1))
