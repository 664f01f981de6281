r"""The item-graph phase: what sites sum in two statistics rounds, and what the server releases.

Everything here is a sum over users (``common.graph.filters`` has the maths and
each user's bound): a site sums its own users, the federation sums the sites
(exactly, with per-site Gaussian noise, or through the secure sum), and the
server post-processes the totals into an :class:`ItemGraph`, with which each
site scores its own users from their own rows. A user's row never leaves the
site.

**Ranking** (GF-CF, the closed form of LightGCN's propagation):

1. round 1: item degrees :math:`d = \sum_u r_u \min(1, C_d / \sqrt{|N(u)|})`,
   sensitivity :math:`C_d` (``item-graph-degree-bound``). Released: :math:`d`,
   and the items :math:`S` the graph covers: the ``item-graph-items`` of
   largest released degree (0: every item; ``"auto"``: :func:`ranking_filter`'s
   rule, about :math:`10 \sqrt n` of :math:`n` under DP, every item without);
2. round 2: :math:`G_S = \sum_u x_u x_u^\top` with :math:`x_u = r_{u,S} /
   \sqrt{|N_S(u)|}`, sensitivity 1 in Frobenius norm, sent as its Frobenius
   isometry :math:`(G_{ii}, \sqrt 2\, G_{ij})_{i<j}` (:func:`isometry`), on
   which Gaussian noise is the symmetric release of
   ``common.graph.filters.release_symmetric``. Released: the filter
   :math:`s_u = r_u L + \alpha n_u^{-\nu} (r_u D^{-\beta} V_k) (V_k^\top D^{\beta} - S
   V_k^\top) - (r_u V_k) \operatorname{diag}(w) V_k^\top` over :math:`S`, :math:`w` and
   :math:`S` BSPM's sharpening over a time :math:`T`, :math:`n_u` the user's number of
   items (``common.graph.filters.spectral_filter``) (``item-graph-exponent``
   :math:`\beta`, ``item-graph-rank`` :math:`k`, ``item-graph-alpha`` :math:`\alpha`,
   ``item-graph-alpha-decay`` :math:`\nu`, ``item-graph-sharpening`` :math:`T`), the
   released degrees floored at the standard deviation of their noise. Without DP and with a
   dense Gram, round 2 also sends the co-occurrence Gram :math:`\sum_u y_u
   y_u^\top` of round 1's bounded rows :math:`y_u` (each user within
   :math:`C_d^2`), and the linear part :math:`L` gains EASE's weights of it
   (``common.graph.filters.with_ease``, ``item-graph-ease-weight``).

**Rating** (after McSherry and Mironov, KDD 2009):

1. round 1: each site computes its users' shrunk means :math:`m_u` from their
   own ratings, and sums :math:`\sum_u w_u (r_u - m_u)` and :math:`\sum_u w_u
   1_{N(u)}` with :math:`w_u = \min(1, C_1 / \max(\lVert r_u - m_u \rVert,
   \sqrt{|N(u)|}))`, and :math:`c \sum_u \delta_u`, :math:`c \sum_u 1` with
   :math:`\delta_u \in [-1, 1]` the user's mean rating's place on the scale
   (:func:`global_mean_sums`); sensitivity :math:`\sqrt 2 \sqrt{C_1^2 + c^2}`.
   Released: the item offsets :math:`b_i` (shrunk toward a prior fitted on the
   released sums, counts and, with item text, the texts' principal components, which
   the server computes from the public catalogue) and the global mean :math:`\mu`, toward
   which every user's mean is shrunk from then on (before it was released, the
   middle of the scale);
2. round 2: the covariance :math:`\sum_u e_u e_u^\top` of each user's
   residuals :math:`e_{ui} = r_{ui} - m_u - b_i` (:math:`m_u` recomputed by the
   site against the released :math:`b_i`), each row bounded to :math:`C_2`,
   sensitivity :math:`C_2^2`. Released: the covariance (and, without DP, the
   co-rating weights), from which every site computes the residuals' cosine
   similarity (:attr:`ItemGraph.similarity`). A site predicts
   :math:`m_u + b_i + \hat e_{ui}`, :math:`\hat e_{ui}` the similarity-weighted
   mean of the user's own residuals on their most similar rated items.

Ratings enter both rounds mapped linearly from the public scale onto
``common.data.dataset.REFERENCE_SCALE``, and predictions are mapped back, so the
settings and bounds mean the same on any scale.

Without DP and with more than ``item-graph-dense-items`` covered items, round
2's Gram is exact and sent sparse, and the filter's linear part keeps the
``item-graph-top-per-row`` largest entries of each row. Under DP the Gram is
always dense, over the covered items.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass, fields, replace
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from common.config import RunConfig
from common.data.dataset import REFERENCE_SCALE, Catalogue, Interactions
from common.data.site import SiteData
from common.errors import InputError
from common.graph.filters import (
    ItemFilter,
    bounded_rows,
    covariance_similarity,
    gram_sum,
    graph_filter,
    isometry,
    item_offset_sums,
    item_offsets,
    item_sum,
    keep_top_per_row,
    mean_popularity,
    offset_prior,
    offset_prior_terms,
    residual_rows,
    symmetric,
    text_components,
    top_items,
    user_means,
    user_rows,
    with_ease,
    without_negative_entries,
)
from common.text import item_text_vectors

STATISTICS_ROUNDS = 2
"""Rounds 1 and 2 of a run with an item graph; training rounds, if any, follow."""


@dataclass(frozen=True)
class RatingNeighbourhood:
    """The rating predictor's settings, chosen on validation (u1.base of MovieLens-100K,
    ``simulations/item_graph_search.py``), with and without DP.

    Attributes:
        item_shrinkage, user_shrinkage: shrinkage of the item offsets toward their prior
            (:math:`\\lambda`) and of the users' means toward the released global mean.
        popularity_prior: shrink the item offsets toward the prior :math:`p_i = a + c
            \\log(1 + N_i) + d^\\top z_i` fitted on the released sums and counts
            (``common.graph.filters.offset_prior``; post-processing), not toward zero.
        text_prior_components: with item text, the prior's :math:`z_i`: the items'
            coordinates on this many principal components of their text vectors
            (``common.graph.filters.text_components``; public); 0: popularity alone.
        unrated_at_mean_popularity: give an item without a positive released count the
            rated items' mean popularity in its prior (it is new, not rare), instead of
            :math:`\\log(1 + 0)` (``common.graph.filters.mean_popularity``).
        count_noise_shrinkage: :math:`\\kappa`, the item offsets' further shrinkage
            :math:`\\kappa \\sigma^2 / N_i` (``common.graph.filters.offset_denominators``),
            :math:`\\sigma` the standard deviation of the noise on the released counts
            :math:`N_i` (public): an offset shrinks by little where its count is far above
            the noise, by much where it is not, and more under per-site noise, whose
            variance is larger by the number of sites.
        bound: each user's bound in both rounds (:math:`C_1 = C_2`; none without DP).
        exponent: the residual rows' degree exponent :math:`\\eta` (``bounded_rows``).
        neighbours, damping: rated items a prediction averages over, and the damping
            of its weights.
        co_count_shrinkage: with co-rating weights (a second Gram, without DP only),
            the shrinkage of each similarity by them; None: no co-rating weights.
        text_neighbours, text_damping: the same for the text neighbourhood, whose
            similarities are the item texts' (``common.graph.features``).
    """

    bound: float
    exponent: float
    neighbours: int
    damping: float
    co_count_shrinkage: float | None
    item_shrinkage: float = 3.0
    user_shrinkage: float = 5.0
    count_noise_shrinkage: float = 5.0
    text_neighbours: int = 50
    text_damping: float = 10.0
    popularity_prior: bool = True
    text_prior_components: int = 8
    unrated_at_mean_popularity: bool = False


RATING_WITH_DP = RatingNeighbourhood(
    1.0, 0.5, 80, 50.0, None, item_shrinkage=0.3, count_noise_shrinkage=8.0
)
"""Under DP: the item offsets' shrinkages chosen again on validation, with the text
neighbourhood (MovieLens-100K u1 at epsilon 8, noise once on the sum and at each of 10
sites; ``python -m simulations.filter_variants --cases u1-dp``), and again once the
offsets shrank toward their prior of popularity and text: kappa 8 (5 before;
3 to 16 tried) ties 12 for the best, once on the sum and per site. The users' means'
shrinkage stays at 5: before the prior 30 validated better there, but it lost on
synthetic ratings, most without item text; with the prior the gain is gone (the README's
*The item graph*)."""
RATING_WITHOUT_DP = RatingNeighbourhood(
    math.inf, 0.0, 80, 0.03, 100.0, unrated_at_mean_popularity=True
)
"""Without DP: the covariance neighbourhood's 80 neighbours and damping 0.03 chosen again
once the text neighbourhood was added (20 and 0.1 before; ``python -m
simulations.filter_variants --cases u1``). An item nobody rated gets the rated items' mean
popularity in its offsets' prior: on items held out of u1.base it validates 1.02 against
1.54 (``--cases cold-ratings``), at 0.0005 on u1's validation split; under DP, where a
rare item's noisy count looks the same, it cost 0.003 there and stays off."""
DIAGONAL_FLOOR = 3.0
"""The noisy covariance's diagonal is floored at this many standard deviations of its
noise."""


def rating_settings(config: RunConfig) -> RatingNeighbourhood:
    return RATING_WITH_DP if config.dp else RATING_WITHOUT_DP


def prior_covariates(
    config: RunConfig, catalogue: Catalogue, settings: RatingNeighbourhood
) -> np.ndarray | None:
    """The item offsets' prior's regressors besides popularity: the catalogue's text
    vectors' top ``settings.text_prior_components`` principal components (public; None
    without item text)."""
    text = item_text_vectors(catalogue, config)
    if text is None or not settings.text_prior_components:
        return None
    return text_components(text, settings.text_prior_components)


@dataclass(frozen=True)
class RankingFilter:
    r"""The ranking filter's settings for one catalogue: each ``item-graph-*`` key's
    value, or with ``"auto"`` (the default) the rule of :func:`ranking_filter`.

    Attributes:
        items: items the graph covers, the top ones by released degree (None: all).
        exponent, rank, alpha: the degree exponent :math:`\beta`, the low-pass rank
            :math:`k` and its weight :math:`\alpha`.
        top_per_row: entries kept in each row of a sparse linear part (None: all).
        ease_weight, ease_ridge: the weight :math:`w` of EASE's part in the linear part
            and EASE's ridge :math:`\lambda` (0: no EASE part, and no co-occurrence Gram).
        sharpening: the sharpening's time :math:`T` within the low-pass basis (0: none).
        alpha_decay: :math:`\nu`, the low-pass weight :math:`\alpha n_u^{-\nu}` of a user
            with :math:`n_u` items (0: :math:`\alpha` for everyone).
        nonnegative: set the released Gram's negative entries to zero before the filter
            is computed from it (post-processing: the Gram of non-negative rows has none).
        text_weight: the weight :math:`\gamma` of the item text's part in the graph's
            score (``common.graph.features.GraphFeatures``; no part without item text).
    """

    items: int | None
    exponent: float
    rank: int
    alpha: float
    top_per_row: int | None
    ease_weight: float = 0.0
    ease_ridge: float = 300.0
    sharpening: float = 0.0
    alpha_decay: float = 0.0
    nonnegative: bool = False
    text_weight: float = 0.0


SMALL_CATALOGUE = RankingFilter(None, 0.25, 16, 1.0, None)
LARGE_CATALOGUE = RankingFilter(None, 0.5, 512, 3.5, 1000, sharpening=2.25, alpha_decay=1.0)
"""The settings chosen on validation (``simulations/item_graph_search.py``) for
MovieLens-100K (1,682 items, dense Gram) and Gowalla (40,981 items, exact sparse Gram;
its rank, alpha, the low-pass weight's decay and sharpening of the blend by
``simulations/filter_variants.py``: 512 of the ranks 256 to 640 it tried, within 0.1 % of
640's validation NDCG@20 at 2/3 of its eigensolver's time; the decay 1, a user's low-pass
part read from their mean row, +2.7 % over none, where MovieLens-100K gained nothing)."""
EXACT_EASE_WEIGHT = 3.0
"""Without DP and with a dense Gram, EASE's part of the linear part (ridge 300): chosen on
validation (``simulations/item_graph_search.py --cases ml-ranking``, MovieLens-100K)."""
TEXT_WEIGHT = {"ranking, dp": 0.3, "ranking": 0.05, "rating, dp": 1.5, "rating": 1.0}
r"""The item text part's weight :math:`\gamma`, chosen on validation on MovieLens-100K
(``simulations/filter_variants.py``): ranking (``--cases ml-no-dp ml-dp``, implicit), of
0 to 0.5, 0.05 without DP and 0.3 under DP (0.2 and 0.3 best with noise once on the sum,
0.3 and 0.5 with per-site noise: a noisier graph leans more on the text); rating
(``--cases u1 u1-dp``, u1), the text neighbourhood's weight, of 0.5 to 2: 1 without DP,
1.5 under DP (50 neighbours and damping 10 in both, of 20 and 50, and 2, 10 and 30)."""


def text_weight(config: RunConfig) -> float:
    """``item-graph-text-weight``, or with ``"auto"`` :data:`TEXT_WEIGHT`'s for the task
    and DP."""
    if config.item_graph_text_weight != "auto":
        return float(config.item_graph_text_weight)
    return TEXT_WEIGHT[config.task + ", dp" * config.dp]


COVERED_ITEMS_PER_ROOT = 10
"""Under DP the graph covers about ``10 sqrt(n)`` of ``n`` items: validation chose 300
(600 within 0.2 %) of MovieLens-100K's 1,682 and 2,000 of Gowalla's 40,981."""


def ranking_filter(config: RunConfig, num_items: int) -> RankingFilter:
    r"""The ranking filter's settings: the keys' values where set, else a rule of public
    quantities (the catalogue's size ``n``, DP, ``item-graph-dense-items``):

    - under DP the graph covers the top :math:`\min(n, \max(100, 10 \sqrt n))` items
      by released degree (rounded to a hundred), whose Gram is released dense;
    - the filter is :data:`LARGE_CATALOGUE`'s when the Gram is exact and sparse (no DP,
      more than ``item-graph-dense-items`` items), else :data:`SMALL_CATALOGUE`'s;
    - without DP and with a dense Gram, the linear part has an EASE part of weight
      :data:`EXACT_EASE_WEIGHT`, from a co-occurrence Gram round 2 adds. Under DP, or
      with a sparse Gram, setting ``item-graph-ease-weight`` raises InputError;
    - the rank is at most the number of covered items (the rule's is cut to it; an
      ``item-graph-rank`` above it raises InputError);
    - under secure aggregation, where the Gram's noise is added once to the federation's
      sum, its negative entries are set to zero (``nonnegative``). With per-site noise,
      :math:`\sqrt{\text{sites}}` times larger, it lost on validation, so there the Gram
      is used as released (``simulations/filter_variants.py --cases ml-dp``);
    - the item text's part weighs :func:`text_weight` (used only with item text).
    """
    covered = num_items
    if config.dp:
        covered = min(num_items, max(100, int(round(COVERED_ITEMS_PER_ROOT * num_items**0.5, -2))))
    large = not config.dp and num_items > config.item_graph_dense_items
    rule = replace(
        LARGE_CATALOGUE if large else SMALL_CATALOGUE,
        items=covered if covered < num_items else None,
    )
    keys = {
        "items": config.item_graph_items,
        "exponent": config.item_graph_exponent,
        "rank": config.item_graph_rank,
        "alpha": config.item_graph_alpha,
        "top_per_row": config.item_graph_top_per_row,
        "ease_ridge": config.item_graph_ease_ridge,
        "sharpening": config.item_graph_sharpening,
        "alpha_decay": config.item_graph_alpha_decay,
    }
    settings = replace(rule, **{name: v for name, v in keys.items() if v != "auto"})
    covered = settings.items or num_items
    if settings.rank > covered:
        if config.item_graph_rank != "auto":
            raise InputError(
                f"item-graph-rank: {settings.rank} eigenvectors of a graph over {covered} "
                f'items; set at most {covered}, or "auto"'
            )
        settings = replace(settings, rank=covered)  # the rule's rank: at most every item
    exact_dense = not config.dp and covered <= config.item_graph_dense_items
    weight = config.item_graph_ease_weight
    if weight == "auto":
        weight = EXACT_EASE_WEIGHT if exact_dense else 0.0
    elif weight and not exact_dense:
        raise InputError(
            f"item-graph-ease-weight: EASE's part needs an exact dense co-occurrence Gram, "
            f"released only without DP and over at most item-graph-dense-items = "
            f"{config.item_graph_dense_items} items (this run: dp = "
            f"{str(config.dp).lower()}, {covered} covered items); set it "
            'to 0 or "auto"'
        )
    return replace(
        settings,
        ease_weight=float(weight),
        nonnegative=config.dp and config.secure_aggregation,
        text_weight=text_weight(config),
    )


Total = np.ndarray | sp.csr_matrix
"""A round's sum: a vector, or (large catalogue without DP) a sparse Gram."""


@dataclass(frozen=True, eq=False)
class ItemGraph:
    r"""What the server has released of the item graph: after round 1, then after round 2.

    Attributes:
        items: the catalogue items the graph covers, ascending.
        degrees: released item degrees over the catalogue (ranking), or each item's
            released count of ratings, each user weighted by their bound (rating).
        degree_noise: standard deviation of the noise on ``degrees`` (0 without DP).
        global_mean: the users' means averaged (rating), the prior of every user's
            shrunk mean after round 1.
        linear, eigenvectors, alpha, input_scale, output_scale, sharpening,
            low_pass_sharpening, alpha_decay: the ranking filter
            (``common.graph.filters.ItemFilter``), from round 2.
        text_weight: the weight of the item text's part of the score (ranking:
            ``RankingFilter``; rating: the text neighbourhood's), from round 2.
        item_sums: the released item sums :math:`S_i` of the offsets (rating; the offsets
            themselves are :attr:`item_bias`).
        item_shrinkage, item_noise_shrinkage, item_prior: the shrinkages :math:`\lambda`
            and :math:`\lambda_\sigma` the item offsets were released with, and the
            coefficients of the prior they shrink toward, None: zero (rating;
            ``common.graph.filters.item_offsets``).
        item_covariates: the prior's public regressors besides popularity, the item
            texts' principal components ``[num_items, q]`` (rating, with item text;
            ``common.graph.filters.text_components``), or None.
        item_unrated_popularity: the popularity the prior gives an item without a
            positive count (``RatingNeighbourhood.unrated_at_mean_popularity``), or None:
            :math:`\log(1 + 0)`.
        covariance, co_counts: the residuals' covariance and, without DP, their
            co-rating weights (rating), from round 2, as released.
        diagonal_floor, co_count_shrinkage: how :attr:`similarity` is computed from them.

    A release is compared and hashed by identity: a process that parses one keeps it
    (``client.site_round.released_graph``) and what is derived from it
    (``common.graph.propagation``).
    """

    items: np.ndarray | None = None
    degrees: np.ndarray | None = None
    degree_noise: float = 0.0
    global_mean: float | None = None
    linear: np.ndarray | sp.csr_matrix | None = None
    eigenvectors: np.ndarray | None = None
    alpha: float = 0.0
    input_scale: np.ndarray | None = None
    output_scale: np.ndarray | None = None
    sharpening: np.ndarray | None = None
    low_pass_sharpening: np.ndarray | None = None
    alpha_decay: float = 0.0
    text_weight: float = 0.0
    item_shrinkage: float = 0.0
    item_noise_shrinkage: float = 0.0
    item_sums: np.ndarray | None = None
    item_prior: np.ndarray | None = None
    item_covariates: np.ndarray | None = None
    item_unrated_popularity: float | None = None
    covariance: np.ndarray | None = None
    co_counts: np.ndarray | None = None
    diagonal_floor: float = 1e-12
    co_count_shrinkage: float = 0.0

    @cached_property
    def item_bias(self) -> np.ndarray | None:
        """Rating: the item offsets :math:`b_i` of the released sums and counts
        (``common.graph.filters.item_offsets``), once round 1 is released."""
        if self.item_sums is None:
            return None
        shrinkages = self.item_shrinkage, self.item_noise_shrinkage
        prior = self.item_prior, self.item_covariates, self.item_unrated_popularity
        return item_offsets(self.item_sums, self.degrees, *shrinkages, *prior)

    @cached_property
    def similarity(self) -> np.ndarray | None:
        """Rating: the residuals' similarity (``covariance_similarity``), once round 2 is
        released; computed once per release."""
        if self.covariance is None:
            return None
        return covariance_similarity(
            self.covariance, self.co_counts, self.co_count_shrinkage, self.diagonal_floor
        )

    @property
    def touched(self) -> np.ndarray:
        """``[num_items]`` bool: the items the release says some user touched, a positive
        released degree (under DP about half of the untouched items pass too, by noise)."""
        return self.degrees > 0

    @property
    def complete(self) -> bool:
        """Whether round 2 has been released, so that the graph can score."""
        return self.linear is not None or self.covariance is not None

    def to_bytes(self) -> bytes:
        """One ``.npz`` payload: a sparse linear part as its CSR arrays, and the symmetric
        covariance and co-rating weights as their upper triangles (half the bytes)."""
        arrays: dict[str, np.ndarray] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if sp.issparse(value):
                for part in ("data", "indices", "indptr"):
                    arrays[f"{f.name}.{part}"] = getattr(value, part)
                arrays[f"{f.name}.shape"] = np.array(value.shape)
            elif f.name in SYMMETRIC_PARTS and value is not None:
                arrays[f"{f.name}.upper"] = value[np.triu_indices(len(value))]
            elif value is not None:
                arrays[f.name] = np.asarray(value)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @staticmethod
    def fingerprint(payload: bytes) -> str:
        """The SHA-256 of a release's bytes (:meth:`to_bytes`): the name it travels and is
        kept under once a site holds it."""
        return hashlib.sha256(payload).hexdigest()

    @classmethod
    def from_bytes(cls, payload: bytes) -> ItemGraph:
        with np.load(io.BytesIO(payload)) as archive:
            stored = dict(archive)
        unknown = {key.split(".")[0] for key in stored} - {f.name for f in fields(cls)}
        if unknown:
            raise InputError(
                f"item graph: holds {', '.join(sorted(unknown))}, which this version of "
                "fedgraphrec does not read (written by another version: run it again "
                "with this one)"
            )
        values: dict[str, object] = {}
        for f in fields(cls):
            if f"{f.name}.shape" in stored:
                parts = tuple(stored[f"{f.name}.{p}"] for p in ("data", "indices", "indptr"))
                values[f.name] = sp.csr_matrix(parts, shape=tuple(stored[f"{f.name}.shape"]))
            elif f"{f.name}.upper" in stored:
                values[f.name] = from_upper_triangle(stored[f"{f.name}.upper"])
            elif f.name in stored:
                value = stored[f.name]  # C order: scipy copies others per product
                values[f.name] = value.item() if value.ndim == 0 else np.ascontiguousarray(value)
        return cls(**values)

    @cached_property
    def item_filter(self) -> ItemFilter:
        """Ranking: the released filter over the catalogue (``degrees``' items), built once
        per release: a process that keeps the release keeps what the filter derives from it
        (on Gowalla its output basis, ``[41k, 512] @ [512, 512]``, takes seconds)."""
        return ItemFilter(
            len(self.degrees),
            self.items,
            self.linear,
            self.eigenvectors,
            self.alpha,
            self.input_scale,
            self.output_scale,
            self.sharpening,
            self.low_pass_sharpening,
            self.alpha_decay,
        )

    def propagation_matrix(self, num_items: int) -> sp.csr_matrix:
        r""":math:`\hat P` over the catalogue, what the learned model propagates item
        representations over: the ranking filter's linear part (zero outside the items it
        covers), or the rating residuals' similarity."""
        if self.similarity is not None:
            return sp.csr_matrix(self.similarity)
        linear = sp.csr_matrix(self.linear)  # rows and columns of the covered items, ascending
        lengths = np.zeros(num_items, np.int64)
        lengths[self.items] = np.diff(linear.indptr)
        return sp.csr_matrix(
            (linear.data, self.items[linear.indices], np.concatenate([[0], np.cumsum(lengths)])),
            shape=(num_items, num_items),
        )


def gram_bounds(config: RunConfig, num_items: int) -> list[float]:
    """The Grams round 2 sends, in order, each as the largest Frobenius norm of one
    user's term :math:`x_u x_u^\top` in it: ranking the filter's Gram (1) and, with an EASE
    part, the co-occurrence Gram of round 1's degree rows (:math:`C_d^2`); rating the
    residuals' covariance and, without DP, the co-rating weights (:math:`C_2^2` each)."""
    if config.task == "ranking":
        bound = config.item_graph_degree_bound
        return [1.0] + [bound**2] * bool(ranking_filter(config, num_items).ease_weight)
    settings = rating_settings(config)
    return [settings.bound**2] * (1 + (settings.co_count_shrinkage is not None))


SYMMETRIC_PARTS = ("covariance", "co_counts")
"""The parts of an :class:`ItemGraph` that are symmetric matrices, sent as upper triangles."""


def from_upper_triangle(upper: np.ndarray) -> np.ndarray:
    """The symmetric matrix whose upper triangle (row by row, diagonal included) is
    ``upper``: each entry exactly as sent."""
    m = (math.isqrt(8 * len(upper) + 1) - 1) // 2
    matrix = np.empty((m, m), upper.dtype)
    rows, columns = np.triu_indices(m)
    matrix[rows, columns] = upper
    matrix[columns, rows] = upper
    return matrix


def sensitivity(config: RunConfig, catalogue: Catalogue, server_round: int) -> float:
    """How far one user moves round ``server_round``'s sum, in L2 (Frobenius) norm."""
    if server_round == 2:
        return math.hypot(*gram_bounds(config, catalogue.num_items))
    if config.task == "ranking":
        return config.item_graph_degree_bound
    bound = rating_settings(config).bound
    return math.sqrt(2.0) * math.sqrt(bound**2 + GLOBAL_MEAN_WEIGHT**2)


def length(config: RunConfig, catalogue: Catalogue, server_round: int, graph: ItemGraph) -> int:
    """The length of round ``server_round``'s vector (public: the server and every site
    know it before anything is computed)."""
    n = catalogue.num_items
    if server_round == 1:
        return n if config.task == "ranking" else 2 * n + 2
    m = len(graph.items)
    return len(gram_bounds(config, n)) * m * (m + 1) // 2


def contribution(
    config: RunConfig,
    site: SiteData,
    server_round: int,
    graph: ItemGraph,
    settings: RatingNeighbourhood | None = None,
) -> Total:
    """The site's exact sum over its users' training rows for round ``server_round``
    (rating: with the app's :func:`rating_settings` unless ``settings`` are given, as
    validation tries others)."""
    n = site.catalogue.num_items
    if config.task == "ranking":
        binary = user_rows(site.train, site.num_users, n)
        if server_round == 1:
            return item_sum(bounded_rows(binary, 0.0, config.item_graph_degree_bound))
        gram = gram_sum(bounded_rows(binary[:, graph.items], 0.5, 1.0), dense=dense(config, graph))
        if not isinstance(gram, np.ndarray):
            return gram
        grams = [gram]
        if ranking_filter(config, n).ease_weight:  # round 1's rows, over the covered items
            degree_rows = bounded_rows(binary, 0.0, config.item_graph_degree_bound)
            grams.append(gram_sum(degree_rows[:, graph.items]))
        return np.concatenate([isometry(gram) for gram in grams])
    settings = settings or rating_settings(config)
    train = on_reference_scale(site)
    if server_round == 1:
        mean = shrunk_user_means(train, site.num_users, np.zeros(n), settings)
        sums, counts = item_offset_sums(train, site.num_users, n, mean, settings.bound)
        return np.concatenate([sums, counts, global_mean_sums(train, site.num_users)])
    mean = shrunk_user_means(train, site.num_users, graph.item_bias, settings, graph.global_mean)
    residuals = residual_rows(train, site.num_users, n, mean, graph.item_bias)
    grams = [gram_sum(bounded_rows(residuals, settings.exponent, settings.bound))]
    if settings.co_count_shrinkage is not None:
        binary = user_rows(site.train, site.num_users, n)
        grams.append(gram_sum(bounded_rows(binary, settings.exponent, settings.bound)))
    return np.concatenate([isometry(gram) for gram in grams])


def released(
    config: RunConfig,
    catalogue: Catalogue,
    server_round: int,
    total: Total,
    graph: ItemGraph,
    noise_std: float,
    settings: RatingNeighbourhood | None = None,
) -> ItemGraph:
    """The graph after round ``server_round``'s ``total`` (post-processing only);
    ``noise_std`` is the standard deviation of the noise on each coordinate of it (rating:
    ``settings`` as for :func:`contribution`)."""
    n = catalogue.num_items
    settings = settings or rating_settings(config)
    ranking = ranking_filter(config, n)
    if config.task == "ranking" and server_round == 1:
        limit = ranking.items
        items = np.arange(n) if limit is None or limit >= n else top_items(total, limit)
        return replace(graph, items=items, degrees=total, degree_noise=noise_std)
    if server_round == 1:
        sums, counts = total[:n], total[n : 2 * n]
        shrinkage = settings.item_shrinkage
        noise_shrinkage = settings.count_noise_shrinkage * noise_std**2
        prior = covariates = unrated = None
        if settings.popularity_prior:
            covariates = prior_covariates(config, catalogue, settings)
            terms = offset_prior_terms(sums, counts, noise_std, covariates).sum(0)
            prior = offset_prior(terms)
            if settings.unrated_at_mean_popularity:
                unrated = float(mean_popularity(terms))
        return replace(
            graph,
            items=np.arange(n),
            degrees=counts,
            degree_noise=noise_std,
            item_shrinkage=shrinkage,
            item_noise_shrinkage=noise_shrinkage,
            item_sums=sums,
            item_prior=prior,
            item_covariates=covariates,
            item_unrated_popularity=unrated,
            global_mean=global_mean(total[2 * n :]),
        )
    if config.task == "rating":
        covariance, *co_counts = (
            symmetric(part) for part in np.split(total, len(gram_bounds(config, n)))
        )
        return replace(
            graph,
            covariance=covariance,
            co_counts=co_counts[0] if co_counts else None,
            diagonal_floor=max(1e-12, DIAGONAL_FLOOR * noise_std),
            co_count_shrinkage=settings.co_count_shrinkage or 0.0,
            text_weight=text_weight(config),
        )
    gram, *cooccurrence = (
        (symmetric(part) for part in np.split(total, len(gram_bounds(config, n))))
        if isinstance(total, np.ndarray)
        else (total,)
    )
    if ranking.nonnegative:
        gram = without_negative_entries(gram)
    item_filter = graph_filter(
        gram,
        graph.degrees[graph.items],
        ranking.exponent,
        ranking.rank,
        ranking.alpha,
        n,
        graph.items,
        floor=max(1.0, graph.degree_noise),
        sharpening=ranking.sharpening,
        alpha_decay=ranking.alpha_decay,
    )
    if cooccurrence:
        item_filter = with_ease(
            item_filter, cooccurrence[0], ranking.ease_ridge, ranking.ease_weight
        )
    linear = item_filter.linear
    if sp.issparse(linear) and ranking.top_per_row is not None:
        linear = keep_top_per_row(linear, ranking.top_per_row)
    return replace(
        graph,
        linear=linear,
        eigenvectors=item_filter.eigenvectors,
        alpha=item_filter.alpha,
        input_scale=item_filter.input_scale,
        output_scale=item_filter.output_scale,
        sharpening=item_filter.sharpening,
        low_pass_sharpening=item_filter.low_pass_sharpening,
        alpha_decay=item_filter.alpha_decay,
        text_weight=ranking.text_weight,
    )


def dense(config: RunConfig, graph: ItemGraph) -> bool:
    """Whether round 2's Gram is sent dense (always under DP)."""
    return config.dp or len(graph.items) <= config.item_graph_dense_items


def on_reference_scale(site: SiteData) -> Interactions:
    """The site's training interactions, their ratings on the reference scale."""
    return replace(site.train, rating=site.catalogue.to_reference_scale(site.train.rating))


def shrunk_user_means(
    train: Interactions,
    num_users: int,
    item_offset: np.ndarray,
    settings: RatingNeighbourhood,
    prior: float | None = None,
) -> np.ndarray:
    """Each user's shrunk mean, from the user's own ratings (on the reference scale) and
    the given item offsets (none before round 1's release), shrunk toward ``prior``: the
    released global mean, or before it the middle of the scale."""
    prior = sum(REFERENCE_SCALE) / 2 if prior is None else prior
    return user_means(train, num_users, item_offset, prior, settings.user_shrinkage)


GLOBAL_MEAN_WEIGHT = 0.25
""":math:`c`: each user's weight in round 1's two global-mean coordinates."""


def global_mean_sums(train: Interactions, num_users: int) -> np.ndarray:
    r"""Round 1's global-mean coordinates: :math:`c \sum_u \delta_u` and :math:`c` times the
    users, with :math:`\delta_u \in [-1, 1]` the user's mean rating's place on the
    reference scale; one user moves them by at most :math:`\sqrt 2 c`."""
    counts = np.bincount(train.user, minlength=num_users)
    rated = counts > 0
    means = np.bincount(train.user, train.rating, num_users)[rated] / counts[rated]
    half = (REFERENCE_SCALE[1] - REFERENCE_SCALE[0]) / 2
    place = (means - sum(REFERENCE_SCALE) / 2) / half
    return GLOBAL_MEAN_WEIGHT * np.array([place.sum(), float(rated.sum())])


def global_mean(released_sums: np.ndarray) -> float:
    """The global mean (users' means averaged, on the reference scale) from round 1's
    released coordinates (post-processing: a noisy count below one user counts as one,
    and the mean is kept on the scale)."""
    place, users = released_sums / GLOBAL_MEAN_WEIGHT
    half = (REFERENCE_SCALE[1] - REFERENCE_SCALE[0]) / 2
    mean = sum(REFERENCE_SCALE) / 2 + half * place / max(users, 1.0)
    return float(np.clip(mean, *REFERENCE_SCALE))
