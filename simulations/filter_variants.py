"""Variants of the item graph's filters, tried on validation and not kept.

The README's *Results* quotes these as what was tried beyond the filters the app
releases. Every figure is a validation figure (the test split is never scored
here), computed by ``simulations/item_graph_search.py``'s code on the same
splits; a variant is a post-processing of the same releases, so it would cost no
budget.

Cases (``--cases``, each writes its own key of the results):

- ``ml-no-dp``: MovieLens-100K implicit without DP: the app's filter (its EASE
  part included) with the item text's part at the weights ``gamma`` of
  :data:`TEXT_WEIGHTS` (``common.graph.features.GraphFeatures``; 0: none, the rule
  before), the app's filter with its low-pass weight decaying with the user's number
  of items (``decayed_variants``, the app's ``item-graph-alpha-decay``), and BSPM-style
  sharpening of its score, ``s - c s L`` (Choi et al., SIGIR 2023: one Euler step of
  ``ds/dt = -s L``).
- ``ml-dp``: the same data at epsilon 8 (delta 1e-5), noise once on the
  federation's sum (what the secure sum gives), the tuned secure-sum row's
  release (the top 300 items, degree share 0.1), ``--seeds`` noise draws: the
  app's filter (the released Gram's negative entries at zero, as under secure
  aggregation) with the item text's part at the weights of :data:`TEXT_WEIGHTS`
  (the rule's 0.3 is the app's) and the Gram as released; EASE's weights of the released Gram
  added (``common.graph.filters.with_ease``); sharpening; the linear part with
  its eigenvalues shrunk, ``max(lambda - tau lambda_1, 0)``; and with per-site
  noise (10 sites, the tuned per-site release: 150 items, beta 0, rank 8) the
  Gram as released (the app's) and with its negative entries at zero, and the
  app's with the text part at each weight; and the app's filter with its low-pass weight
  decaying (``decayed_variants``).
- ``u1``: MovieLens-100K u1 ratings without DP: the app's neighbourhood
  predictor, and EASE's regression of the residuals on each other
  (:math:`\\hat e_u = e_u B`, ``B`` from the released covariance) added with
  weights ``a`` (the neighbourhood) and ``b`` (EASE's part); the app's predictor with
  the item offsets shrunk toward zero instead of their prior, with the prior over
  each of :data:`TEXT_PRIOR_COMPONENTS` text components (0: popularity alone), and with
  an unrated item at ``log(1 + 0)`` instead of the mean popularity; and the text
  neighbourhood (``common.graph.features.GraphFeatures``: the user's residuals
  weighted by the item texts' similarity) at each weight, neighbours and damping; and
  the covariance neighbourhood's neighbours and damping, the text neighbourhood at the
  app's.
- ``u1-dp``: the same at epsilon 8 (delta 1e-5), noise once on the federation's sum,
  round 1 at the app's share, ``--seeds`` noise draws: the app's predictor without
  its text neighbourhood, and with it at each setting; and the app's predictor with
  the item offsets' shrinkages ``lambda`` and ``kappa`` and the users' means'
  (``common.graph.release.RatingNeighbourhood``) at each setting, the rules before,
  the offsets shrunk toward zero, and their prior over each number of text components,
  the noise once on the sum and at each of 10 sites.
- ``synthetic-ratings``: the users' means' shrinkages of ``u1-dp``, the offsets
  shrunk toward zero instead of their prior, and the prior of popularity alone, on the built-in
  synthetic ratings at epsilon 8, with and without the text neighbourhood (test RMSE over
  the global mean's): a check on other data of what u1's validation chose.
- ``cold-ratings``: the app's rating predictor on items nobody rated in training
  (MovieLens-100K u1): a tenth of the items held out of u1.base, scored on their
  u1.base ratings (validation, which chooses), and a tenth of the catalogue held out
  of everything (``cold-item-fraction = 0.1``), scored once on its test ratings;
  unrated items at the rated items' mean popularity or at ``log(1 + 0)`` in the
  offsets' prior, popularity alone, and the offsets toward zero; against the global
  mean and the same release's user mean + item offset (the bias baseline); without DP
  and at epsilon 8 once on the sum (``--seeds`` draws).
- ``gowalla``: Gowalla without DP (5,000 validation users, as the search):
  the app's filter (beta 1/2) sharpened within its top-k eigenvectors by one
  RK4 step of BSPM's ODE over a time T (``common.graph.filters.spectral_filter``,
  the app's ``item-graph-sharpening``; the full ``s L`` costs a product with a
  36-million-entry matrix per user): the linear part alone (the rule before),
  and the blend of the linear and low-pass parts, as BSPM-EM sharpens, for
  ranks k up to 640, from one eigendecomposition; and the blend with its low-pass
  weight decaying with the user's number of items, ``alpha n_u^-nu``
  (``ItemFilter.low_pass_weights``, the app's ``item-graph-alpha-decay``), at each
  decay of :data:`GOWALLA_ALPHA_DECAYS`; and the rule before and the app's rule with the
  linear part cut to the entries per row that the app ships
  (``common.graph.filters.keep_top_per_row``).
- ``gowalla-second-draw``: those two on a second validation split of Gowalla (the
  split's seed 1, 5,000 of its users): how much of a gain chosen on the first split
  is that draw's.
- ``gowalla-all-users``: the large-catalogue rule (as shipped) around its setting, each
  user's low-pass weight's decay :math:`\nu`, its :math:`\alpha` and the sharpening's
  ``T``, on every validation user of the split (29,858, not 5,000), in two halves
  (even and odd user indices) whose figures are reported apart, as a check of how much
  of a difference between settings is the users': the choice is made on the whole. It
  prints the mean training degree of the training, validation and test items.
- ``gowalla-dp``: Gowalla at epsilon 8 (delta 1e-6), noise once on the sum, the
  tuned release (the top 2,000 items by released degree, degree share 0.25, beta
  0.25, the linear part alone), ``--seeds`` draws: the app's filter (the Gram's
  negative entries at zero), the Gram as released, and the app's linear part
  truncated to its top eigenpairs (denoising); and, without noise, the same
  filter over the top 2,000, 4,000 and 8,000 items by exact degree (what covering
  more items would reach).
- ``gowalla-dp-subspace``: the same release's degrees, and instead of the Gram a noisy
  subspace iteration (Hardt and Price, NeurIPS 2014) over the top 2,000 or 8,000
  items: ``L`` releases of ``G V`` (``[M, k]``, one user's change at most 1 in
  Frobenius norm for an orthonormal ``V``), each at ``sqrt(L)`` times the Gram's noise
  multiplier so that together they cost what the Gram costs, and the filter ``D^-b Q
  diag(lambda / lambda_1) Q^T D^-b`` of the last one's Rayleigh-Ritz pairs: what a
  rank-``k`` release over more items reaches, with and without the noise.
- ``bspm``: the same 5,000 Gowalla validation users: BSPM-EM itself at its published
  settings (``simulations.item_graph_search.bspm_scorer``: the whole ``L`` in every
  RK4 product, central), the reference for the app's sharpening within the basis.

    python -m simulations.filter_variants [--cases ml-no-dp ml-dp u1 u1-dp synthetic-ratings
        cold-ratings gowalla gowalla-second-draw gowalla-all-users gowalla-dp
        gowalla-dp-subspace bspm]
        [--seeds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as sla
from matplotlib.figure import Figure

from common.config import default_config
from common.data import load_site
from common.evaluation import rating_metrics
from common.graph.features import GraphFeatures, covered_text_sums, text_neighbours, text_scale
from common.graph.filters import (
    ItemFilter,
    bounded_rows,
    degree_normalised,
    ease_weights,
    gram_sum,
    graph_filter,
    item_sum,
    keep_top_per_row,
    normalised_spectrum,
    spectral_filter,
    split_noise_multiplier,
    top_items,
    with_ease,
    without_negative_entries,
)
from common.graph.release import (
    LARGE_CATALOGUE,
    ItemGraph,
    RatingNeighbourhood,
    contribution,
    rating_settings,
    released,
    sensitivity,
)
from common.text import item_text_vectors
from simulations.harness import MOVIELENS_IMPLICIT, RESULTS, data_config, write_results
from simulations.item_graph_search import (
    BSPM_GOWALLA,
    NDCG,
    RankingData,
    bspm_scorer,
    evaluate,
    gowalla_site,
    one_release,
    ranking_data,
    released_sums,
    spread,
    validation_users,
)

EPSILON, DELTA = 8.0, 1e-5
SHARPENING = (0.1, 0.2, 0.3, 0.5)
TEXT_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
RATING_TEXT_WEIGHTS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
APP_DP = "the app's filter, text part gamma = 0.3"
GOWALLA_RANKS = (256, 384, 512, 640)
ML_ALPHA_DECAYS = (0.5, 1.0)
"""The low-pass weight's decays :math:`\nu` tried on MovieLens-100K (``decayed_variants``)."""
GOWALLA_ALPHA_DECAYS = {0.5: (0.5, 0.75, 1.0), 0.75: (1.25, 1.5, 2.0), 1.0: (3.0, 3.5, 4.0, 5.0)}
"""The low-pass weight's decays :math:`\nu` tried on Gowalla, each with its weights
:math:`\alpha` (``alpha n_u^-nu``: at the median validation user's 18 training items, :math:`\alpha`
0.2 at :math:`\nu = 0` is 0.85 at 1/2, 1.7 at 3/4 and 3.6 at 1)."""
OFFSET_SHRINKAGES = tuple(itertools.product((0.0, 0.3, 1.0), (3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0)))
USER_SHRINKAGES = (2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0)
TEXT_PRIOR_COMPONENTS = (0, 4, 16)
COVARIANCE_NEIGHBOURHOODS = {
    False: tuple(itertools.product((20, 40, 80, 160, 400), (0.03, 0.1, 0.3))),
    True: tuple(itertools.product((20, 80, 200), (10.0, 50.0, 200.0, math.inf))),
}
OFFSET_PLACEMENTS = {"noise once on the sum": 1, "noise at each of 10 sites": 10}


def exact_graph(config) -> tuple[ItemGraph, object]:
    """The app's item graph released exactly from one site holding every user."""
    site = load_site(config, 0, 1)
    return one_site_graph(config, site, None), site


def validation_ndcg(
    item_filter: ItemFilter,
    data: RankingData,
    change: Callable[[np.ndarray, sp.csr_matrix], np.ndarray] | None = None,
    users: np.ndarray | None = None,
) -> float:
    """Validation NDCG@20 of the filter's scores, or of ``change(scores, rows)``."""

    def scores(batch: np.ndarray) -> np.ndarray:
        rows = data.rows[batch]
        values = item_filter.scores(rows)
        return values if change is None else change(values, rows).astype(np.float32)

    return evaluate(scores, data, "val", users)[NDCG]


def sharpened(item_filter: ItemFilter, c: float) -> Callable:
    """``s - c s L`` at the covered items."""
    items = item_filter.items

    def change(values: np.ndarray, rows: sp.csr_matrix) -> np.ndarray:
        covered = values[:, items].astype(np.float64)
        values = values.astype(np.float64)
        values[:, items] = covered - c * covered @ item_filter.linear
        return values

    return change


def with_text(item_filter: ItemFilter, text: sp.csr_matrix, weight: float) -> Callable:
    """The filter's score plus the item text's part at weight ``weight`` (the app's
    ``GraphFeatures.scores``)."""
    covered = item_filter.items

    def change(values: np.ndarray, rows: sp.csr_matrix) -> np.ndarray:
        sums = covered_text_sums(text, rows, covered)
        values[:, covered] += text_scale(values[:, covered], sums, weight)[:, None] * sums
        return values

    return change


def text_graph(site) -> sp.csr_matrix:
    """The catalogue's text-neighbour graph, as the app's sites build it."""
    config = data_config("ml-100k", **MOVIELENS_IMPLICIT, item_graph="filter")
    return text_neighbours(item_text_vectors(site.catalogue, config))


def text_variants(item_filter: ItemFilter, text: sp.csr_matrix, name: str) -> dict:
    """``name`` with the item text's part at each of :data:`TEXT_WEIGHTS`."""
    return {
        f"{name}, text part gamma = {weight}": (item_filter, with_text(item_filter, text, weight))
        for weight in TEXT_WEIGHTS
    }


def median_items(data: RankingData, users: np.ndarray | None = None) -> float:
    """The median number of training items of ``users`` (default: every user), by which
    the alpha grids of the low-pass weight's decays are scaled."""
    rows = data.rows if users is None else data.rows[users]
    return float(np.median(np.asarray(rows.sum(1)).ravel()))


def decayed_variants(
    item_filter: ItemFilter, median: float, text: sp.csr_matrix, weight: float
) -> dict:
    """The filter with its low-pass weight decaying as ``alpha_u = c alpha (m / n_u)^nu``
    (the app's ``item-graph-alpha-decay``, ``m`` the ``median`` user's number of items,
    :func:`median_items`), at each decay of :data:`ML_ALPHA_DECAYS` and ``c`` of 0.5, 1
    and 2, its text part at ``weight``."""
    variants = {}
    for decay, factor in itertools.product(ML_ALPHA_DECAYS, (0.5, 1.0, 2.0)):
        alpha = factor * item_filter.alpha * median**decay
        decayed = dataclasses.replace(item_filter, alpha=alpha, alpha_decay=decay)
        name = f"low-pass weight {factor} alpha (median n_u / n_u)^{decay}"
        variants[name] = (decayed, with_text(decayed, text, weight))
    return variants


def movielens_without_dp() -> dict:
    config = data_config("ml-100k", **MOVIELENS_IMPLICIT, dp=False, item_graph="filter")
    graph, site = exact_graph(config)
    data = ranking_data(site)
    item_filter = graph.item_filter
    text = text_graph(site)
    variants = text_variants(item_filter, text, "the app's filter")
    median = median_items(data)
    print("the median user's number of training items", median, flush=True)
    variants |= decayed_variants(item_filter, median, text, 0.05)
    results = {name: validation_ndcg(f, data, change) for name, (f, change) in variants.items()}
    for c in SHARPENING:
        results[f"sharpened, c = {c}"] = validation_ndcg(
            item_filter, data, sharpened(item_filter, c)
        )
    return results


def movielens_dp(seeds: int) -> dict:
    site = load_site(data_config("ml-100k", **MOVIELENS_IMPLICIT), 0, 1)
    data = ranking_data(site)
    n = data.num_items
    users = data.rows.shape[0]
    z = one_release(EPSILON, DELTA)
    text = text_graph(site)
    median = median_items(data)
    print("the median user's number of training items", median, flush=True)
    values: dict[str, list[float]] = {}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        release = released_sums(data.rows, np.zeros(users, np.int64), 0.1, 10.0, 300, z, rng)
        floor = max(1.0, release.degree_noise_std)
        degrees = release.degrees[release.items]
        gram = without_negative_entries(release.gram)  # the app's, under secure aggregation
        item_filter = graph_filter(gram, degrees, 0.25, 16, 1.0, n, release.items, floor)
        as_released = graph_filter(release.gram, degrees, 0.25, 16, 1.0, n, release.items, floor)
        variants = text_variants(item_filter, text, "the app's filter") | {
            "the Gram as released, negative entries kept": (as_released, None),
        }
        variants |= decayed_variants(item_filter, median, text, 0.3)
        for ridge in (30, 100, 300, 1000):
            for weight in (0.3, 1.0, 3.0):
                blended = with_ease(item_filter, gram, ridge, weight)
                variants[f"+ EASE of the released Gram, ridge {ridge}, w = {weight}"] = (
                    blended,
                    None,
                )
        for c in SHARPENING:
            variants[f"sharpened, c = {c}"] = (item_filter, sharpened(item_filter, c))
        eigenvalues, eigenvectors = np.linalg.eigh(degree_normalised(gram, degrees, 0.25, floor))
        for tau in (0.02, 0.05, 0.1, 0.2):
            kept = np.maximum(eigenvalues - tau * eigenvalues[-1], 0.0) / eigenvalues[-1]
            shrunk = dataclasses.replace(item_filter, linear=(eigenvectors * kept) @ eigenvectors.T)
            variants[f"eigenvalues shrunk, tau = {tau}"] = (shrunk, None)
        per_site = released_sums(data.rows, np.arange(users) % 10, 0.1, 10.0, 150, z, rng)
        floor = max(1.0, per_site.degree_noise_std)
        degrees = per_site.degrees[per_site.items]
        for name, per_site_gram in (
            ("as released (the app's)", per_site.gram),
            ("negative entries at zero", without_negative_entries(per_site.gram)),
        ):
            per_site_filter = graph_filter(
                per_site_gram, degrees, 0.0, 8, 1.0, n, per_site.items, floor
            )
            variants |= text_variants(
                per_site_filter, text, f"per-site noise, 10 sites, 150 items: the Gram {name}"
            )
        for name, (variant, change) in variants.items():
            values.setdefault(name, []).append(validation_ndcg(variant, data, change))
        print("ml-dp draw", seed, values[APP_DP][-1], flush=True)
    return {name: spread(v) for name, v in values.items()}


def one_site_graph(
    config,
    site,
    rng: np.random.Generator | None,
    sites: int = 1,
    settings: RatingNeighbourhood | None = None,
) -> ItemGraph:
    """The app's item graph from one ``site`` holding every user: exact (``rng`` None),
    or at epsilon 8 with the noise once on the sum (``sites`` 1) or at each of ``sites``
    sites (a sum whose noise variance is ``sites`` times larger), round 1 at the app's
    share; ratings with the app's settings, or ``settings``."""
    graph = ItemGraph()
    for server_round in (1, 2):
        total = contribution(config, site, server_round, graph, settings)
        noise_std = 0.0
        if rng is not None:
            noise_std = release_noise(config, site, server_round, sites)
            total = total + rng.normal(0.0, noise_std, total.shape)
        graph = released(config, site.catalogue, server_round, total, graph, noise_std, settings)
    return graph


def release_noise(config, site, server_round: int, sites: int = 1) -> float:
    """The noise's standard deviation on each coordinate of round ``server_round``'s sum at
    epsilon 8, round 1 at the app's share, added once (``sites`` 1) or at each of
    ``sites`` sites."""
    share = config.first_statistics_share
    multipliers = split_noise_multiplier(one_release(EPSILON, DELTA), [share, 1 - share])
    scale = math.sqrt(sites) * sensitivity(config, site.catalogue, server_round)
    return multipliers[server_round - 1] * scale


def rating_parts(config, site, graph: ItemGraph, **text: float) -> np.ndarray:
    """``[P, 4]`` the app's rating features of the validation pairs, the text
    neighbourhood's at weight 1 and the ``text_neighbours`` / ``text_damping`` given."""
    settings = dataclasses.replace(rating_settings(config), **text)
    vectors = item_text_vectors(site.catalogue, config)
    features = GraphFeatures(dataclasses.replace(graph, text_weight=1.0), site, settings, vectors)
    return features.of_pairs(site.val.user, site.val.item)


def validation_rmse(site, reference_scale: np.ndarray) -> float:
    predicted = site.catalogue.from_reference_scale(reference_scale)
    error = site.catalogue.limited(predicted) - site.val.rating
    return float(np.sqrt(np.mean(error**2)))


def lowest_first(values: dict[str, list[float]]) -> dict:
    """Each setting's :func:`spread` over its draws, the lowest mean (RMSE) first."""
    return {
        name: spread(v)
        for name, v in sorted(values.items(), key=lambda item: statistics.mean(item[1]))
    }


def text_neighbourhoods(config, site, graphs: list[ItemGraph]) -> dict:
    """Validation RMSE of the app's rating predictor with its text neighbourhood at each
    weight of :data:`RATING_TEXT_WEIGHTS`, neighbours and damping, over ``graphs``."""
    values: dict[str, list[float]] = {}
    for graph in graphs:
        for neighbours, damping in itertools.product((20, 50), (2.0, 10.0, 30.0)):
            parts = rating_parts(
                config, site, graph, text_neighbours=neighbours, text_damping=damping
            )
            for weight in RATING_TEXT_WEIGHTS:
                name = f"text: {neighbours} neighbours, damping {damping}, weight {weight}"
                prediction = parts[:, :3].sum(1) + weight * parts[:, 3]
                values.setdefault(name, []).append(validation_rmse(site, prediction))
    return lowest_first(values)


def covariance_neighbourhoods(config, site, graphs: list[ItemGraph]) -> dict:
    """Validation RMSE of the app's rating predictor (its text neighbourhood at the app's
    weight) with the covariance neighbourhood's neighbours and damping at each of
    :data:`COVARIANCE_NEIGHBOURHOODS` (infinite damping: no covariance neighbourhood),
    over ``graphs``."""
    text = item_text_vectors(site.catalogue, config)
    values: dict[str, list[float]] = {}
    for graph, (neighbours, damping) in itertools.product(
        graphs, COVARIANCE_NEIGHBOURHOODS[config.dp]
    ):
        settings = dataclasses.replace(
            rating_settings(config), neighbours=neighbours, damping=damping
        )
        prediction = GraphFeatures(graph, site, settings, text).of_pairs(
            site.val.user, site.val.item
        )
        name = f"covariance: {neighbours} neighbours, damping {damping}"
        values.setdefault(name, []).append(validation_rmse(site, prediction.sum(1)))
    return lowest_first(values)


def movielens_ratings() -> dict:
    config = data_config("ml-100k", split="u1", dp=False, item_graph="filter")
    graph, site = exact_graph(config)
    parts = rating_parts(config, site, graph)  # the mean, the offset, the neighbourhoods
    toward_zero = dataclasses.replace(rating_settings(config), popularity_prior=False)
    results = {
        "the app's neighbourhood predictor, without text": validation_rmse(
            site, parts[:, :3].sum(1)
        ),
        "the app's, offsets toward zero": validation_rmse(
            site,
            rating_parts(config, site, one_site_graph(config, site, None, 1, toward_zero)).sum(1),
        ),
    }
    unrated = dataclasses.replace(rating_settings(config), unrated_at_mean_popularity=False)
    results["the app's, unrated items at log(1 + 0)"] = validation_rmse(
        site, rating_parts(config, site, one_site_graph(config, site, None, 1, unrated)).sum(1)
    )
    for count in TEXT_PRIOR_COMPONENTS:
        trial = dataclasses.replace(rating_settings(config), text_prior_components=count)
        graph_of_trial = one_site_graph(config, site, None, 1, trial)
        results[f"the app's, the offsets' prior with {count} text components"] = validation_rmse(
            site, rating_parts(config, site, graph_of_trial).sum(1)
        )
    residuals = GraphFeatures(graph, site, rating_settings(config)).residuals[site.val.user]
    for ridge in (30, 100, 300, 1000, 3000):
        weights = ease_weights(graph.covariance, ridge)
        ease = np.asarray(residuals.multiply(weights[:, site.val.item].T).sum(1)).ravel()
        grid = {
            (a, b): validation_rmse(site, parts[:, :2].sum(1) + a * parts[:, 2] + b * ease)
            for a in (0.0, 0.5, 0.75, 1.0)
            for b in (0.25, 0.5, 0.75, 1.0, 1.5)
        }
        (a, b), best = min(grid.items(), key=lambda item: item[1])
        results[f"+ EASE of the residuals, ridge {ridge} (best a, b: {a}, {b})"] = best
    return (
        results
        | text_neighbourhoods(config, site, [graph])
        | covariance_neighbourhoods(config, site, [graph])
    )


def movielens_ratings_dp(seeds: int) -> dict:
    config = data_config(
        "ml-100k", split="u1", item_graph="filter", target_epsilon=EPSILON, delta=DELTA
    )
    site = load_site(config, 0, 1)
    graphs = [one_site_graph(config, site, np.random.default_rng(seed)) for seed in range(seeds)]
    without = [validation_rmse(site, rating_parts(config, site, g)[:, :3].sum(1)) for g in graphs]
    return (
        {"the app's neighbourhood predictor, without text": spread(without)}
        | text_neighbourhoods(config, site, graphs)
        | covariance_neighbourhoods(config, site, graphs)
        | rating_shrinkages(config, site, seeds)
    )


def rating_shrinkages(config, site, seeds: int) -> dict:
    """Validation RMSE of the app's predictor (its text neighbourhood at the app's weight)
    with the item offsets shrunk by ``lambda + kappa sigma^2 / N_i`` for each ``(lambda,
    kappa)`` of :data:`OFFSET_SHRINKAGES` (the users' means at the app's shrinkage), with
    the users' means shrunk by each of :data:`USER_SHRINKAGES` (the offsets at the app's),
    and by the rules before (offsets by ``max(3, 3.5 sigma)``, users' means by 5),
    with the offsets shrunk toward zero instead of their prior, and with the prior over
    each of :data:`TEXT_PRIOR_COMPONENTS` text components (0: popularity alone) and with
    an unrated item at the rated items' mean popularity in it; the
    noise once on the sum and at each of 10 sites, the same draws for every setting. Next
    to them, the app's user mean and item offset alone, of the same release: the DP
    baseline the whole predictor must beat, under either noise."""
    app, text = rating_settings(config), item_text_vectors(site.catalogue, config)
    values: dict[str, list[float]] = {}
    for placement, sites in OFFSET_PLACEMENTS.items():
        sigma = release_noise(config, site, 1, sites)
        before = {"item_shrinkage": max(3.0, 3.5 * sigma), "count_noise_shrinkage": 0.0}
        settings = {
            f"{placement}: offsets lambda {a}, kappa {k}": {
                "item_shrinkage": a,
                "count_noise_shrinkage": k,
            }
            for a, k in OFFSET_SHRINKAGES
        } | {f"{placement}: users' means {u}": {"user_shrinkage": u} for u in USER_SHRINKAGES}
        settings[f"{placement}: the rules before"] = before | {"user_shrinkage": 5.0}
        settings[f"{placement}: offsets toward zero"] = {"popularity_prior": False}
        for count in TEXT_PRIOR_COMPONENTS:
            name = f"{placement}: the prior with {count} text components"
            settings[name] = {"text_prior_components": count}
        settings[f"{placement}: unrated items at the mean popularity"] = {
            "unrated_at_mean_popularity": True
        }
        settings[f"{placement}: the app's"] = {}
        parts_of: dict[tuple[int, RatingNeighbourhood], np.ndarray] = {}  # the app's, once
        for seed, (name, changes) in itertools.product(range(seeds), settings.items()):
            trial = dataclasses.replace(app, **changes)
            if (seed, trial) not in parts_of:
                rng = np.random.default_rng(seed)
                graph = one_site_graph(config, site, rng, sites, trial)
                features = GraphFeatures(graph, site, trial, text)
                parts_of[seed, trial] = features.of_pairs(site.val.user, site.val.item)
            parts = parts_of[seed, trial]
            values.setdefault(name, []).append(validation_rmse(site, parts.sum(1)))
            if not changes:
                baseline = f"{placement}: the app's user mean + item offset alone"
                values.setdefault(baseline, []).append(validation_rmse(site, parts[:, :2].sum(1)))
    return lowest_first(values)


def synthetic_ratings() -> dict:
    """The users' means' shrinkage, the offsets shrunk toward zero instead of their
    prior, and the prior of popularity alone (no text components), under DP on the
    built-in synthetic ratings (200 users of about 20 ratings, 60 items; the test split),
    with and without the text neighbourhood:
    test RMSE over the global mean's, at epsilon 8 with the noise once on the sum. Data
    other than u1's, to check a setting u1's validation chose."""
    config = default_config(
        task="rating", synthetic_users=200, synthetic_items=60, target_epsilon=EPSILON
    )
    site = load_site(config, 0, 1)
    text = item_text_vectors(site.catalogue, config)
    mean_rmse = np.sqrt(np.mean((site.train.rating.mean() - site.test.rating) ** 2))
    results = {}
    trials = {f"users' means {u}": {"user_shrinkage": u} for u in USER_SHRINKAGES}
    trials["offsets toward zero"] = {"popularity_prior": False}
    trials["the prior of popularity alone"] = {"text_prior_components": 0}
    for trial, changes in trials.items():
        settings = dataclasses.replace(rating_settings(config), **changes)
        graph = one_site_graph(config, site, np.random.default_rng(0), 1, settings)
        for name, vectors in (("without text", None), ("with text", text)):
            predicted = GraphFeatures(graph, site, settings, vectors).predict(site.test)
            rmse = np.sqrt(np.mean((predicted - site.test.rating) ** 2))
            results[f"{trial}, {name}"] = float(rmse / mean_rmse)
    return results


def cold_ratings(seeds: int) -> dict:
    """RMSE of the app's rating predictor on items nobody rated in training, whose offsets
    are their prior alone: an unrated item at the rated items' mean popularity or at
    ``log(1 + 0)`` (the app's is the first without DP, the second under DP), the prior of
    popularity alone, and the offsets toward zero; without DP and at epsilon 8 with the
    noise once on the sum. On validation, which chooses: a tenth of the items held out of
    u1.base, scored on their u1.base ratings; on test, measured once: a tenth of the
    catalogue held out of everything (``cold-item-fraction = 0.1``), its test ratings."""
    results: dict[str, list[float]] = {}
    for privacy, changes in (
        ("no DP", {"dp": False}),
        ("epsilon 8", {"target_epsilon": EPSILON, "delta": DELTA}),
    ):
        config = data_config("ml-100k", split="u1", item_graph="filter", **changes)
        full = load_site(config, 0, 1)
        held = np.random.default_rng(100).random(full.catalogue.num_items) < 0.1
        warm = dataclasses.replace(
            full,
            train=full.train.select(~held[full.train.item]),
            val=full.val.select(~held[full.val.item]),
        )
        cold = load_site(  # "filter+gcn" lets the split hold cold items out; the rows
            # score the graph's own predictor, released as the filter's (one_site_graph)
            data_config(
                "ml-100k", split="u1", item_graph="filter+gcn", cold_item_fraction=0.1, **changes
            ),
            0,
            1,
        )
        splits = {
            "validation": (warm, full.train.select(held[full.train.item])),
            "test": (cold, cold.cold),
        }
        text = item_text_vectors(full.catalogue, config)
        app = rating_settings(config)
        trials = {
            "unrated at the mean popularity": {"unrated_at_mean_popularity": True},
            "unrated at log(1 + 0)": {"unrated_at_mean_popularity": False},
            "popularity alone, unrated at log(1 + 0)": {
                "unrated_at_mean_popularity": False,
                "text_prior_components": 0,
            },
            "toward zero": {"popularity_prior": False},
        }
        for (split, (site, pairs)), (name, trial) in itertools.product(
            splits.items(), trials.items()
        ):
            settings = dataclasses.replace(app, **trial)
            for seed in range(seeds if config.dp else 1):
                rng = np.random.default_rng(seed) if config.dp else None
                graph = one_site_graph(config, site, rng, 1, settings)
                features = GraphFeatures(graph, site, settings, text)
                predicted = site.catalogue.limited(features.predict(pairs))
                results.setdefault(f"{privacy}, {split}: {name}", []).append(
                    rating_metrics(predicted - pairs.rating)["rmse"]
                )
                if name == "toward zero":  # the bias model of the same release: the baseline
                    parts = features.of_pairs(pairs.user, pairs.item)[:, :2].sum(1)
                    bias = site.catalogue.from_reference_scale(parts)
                    errors = site.catalogue.limited(bias) - pairs.rating
                    baseline = f"{privacy}, {split}: user mean + item offset (bias baseline)"
                    results.setdefault(baseline, []).append(rating_metrics(errors)["rmse"])
        for split, (site, pairs) in splits.items():
            errors = site.train.rating.mean() - pairs.rating
            results[f"{privacy}, {split}: global mean"] = [rating_metrics(errors)["rmse"]]
    return {name: spread(v) for name, v in results.items()}


def gowalla_spectrum(data: RankingData, k: int) -> tuple:
    """``normalised_spectrum`` of Gowalla's exact sparse Gram (beta 1/2), ``k`` eigenpairs, with
    the degrees of the app's round 1 (each user's row bounded to ``item-graph-degree-bound``)."""
    gram = gram_sum(bounded_rows(data.rows, 0.5, 1.0), dense=False)
    degrees = item_sum(bounded_rows(data.rows, 0.0, default_config().item_graph_degree_bound))
    return normalised_spectrum(gram, degrees, 0.5, k)


def shipped_rules(spectrum: tuple, data: RankingData, users: np.ndarray) -> dict:
    """Validation NDCG@20 of the large-catalogue rule before (one alpha, 0.2, for every
    user) and the app's, from ``spectrum`` (:func:`gowalla_spectrum`), the linear part cut
    to the entries a row that the app ships."""
    linear, mu, vectors, degree_scale = spectrum
    shipped = keep_top_per_row(linear, LARGE_CATALOGUE.top_per_row)
    k, time = LARGE_CATALOGUE.rank, LARGE_CATALOGUE.sharpening
    results = {}
    for alpha, decay in ((0.2, 0.0), (LARGE_CATALOGUE.alpha, LARGE_CATALOGUE.alpha_decay)):
        rule = spectral_filter(
            shipped, mu[:k], vectors[:, :k], degree_scale, alpha, data.num_items, None, time, decay
        )
        name = (
            f"as shipped (1,000 entries a row), T = {time}, k = {k}, alpha = {alpha} n_u^-{decay}"
        )
        results[name] = validation_ndcg(rule, data, users=users)
    return results


def gowalla() -> dict:
    data = ranking_data(gowalla_site())
    users = validation_users(data)
    print("the validation users' median number of items", median_items(data, users), flush=True)
    spectrum = gowalla_spectrum(data, max(GOWALLA_RANKS))
    linear, mu, vectors, degree_scale = spectrum

    def variant(k: int, alpha: float, time: float, decay: float = 0.0) -> ItemFilter:
        return spectral_filter(
            linear, mu[:k], vectors[:, :k], degree_scale, alpha, data.num_items, None, time, decay
        )

    before = dataclasses.replace(variant(512, 0.15, 2.5), low_pass_sharpening=None)
    results = {
        "the linear part alone sharpened, T = 2.5, k = 512, alpha = 0.15 (the rule before)": (
            validation_ndcg(before, data, users=users)
        )
    }
    for k in GOWALLA_RANKS:
        for time in (2.0, 2.25, 2.5):
            for alpha in (0.15, 0.2, 0.25):
                results[f"the blend sharpened, T = {time}, k = {k}, alpha = {alpha}"] = (
                    validation_ndcg(variant(k, alpha, time), data, users=users)
                )
        print("gowalla", k, results, flush=True)
    for decay, alphas in GOWALLA_ALPHA_DECAYS.items():
        for k, time, alpha in itertools.product((512, 640), (2.0, 2.25), alphas):
            if (k, time) == (512, 2.25) or (decay == 1.0 and alpha in (3.5, 4.0)):
                name = f"the blend sharpened, T = {time}, k = {k}, alpha = {alpha} n_u^-{decay}"
                results[name] = validation_ndcg(variant(k, alpha, time, decay), data, users=users)
        print("gowalla, decay", decay, results, flush=True)
    return results | shipped_rules(spectrum, data, users)


def gowalla_second_draw() -> dict:
    """:func:`shipped_rules` on a second validation split of Gowalla (the split's seed 1):
    how much of a gain chosen on the first is the draw's."""
    data = ranking_data(load_site(data_config("gowalla", task="ranking", seed=1), 0, 1))
    spectrum = gowalla_spectrum(data, LARGE_CATALOGUE.rank)
    return shipped_rules(spectrum, data, validation_users(data))


GOWALLA_ALL_USERS = (
    (0.0, 0.15, 2.25),
    (0.0, 0.2, 2.25),
    (0.0, 0.25, 2.25),
    (0.0, 0.2, 2.0),
    (0.0, 0.2, 2.5),
    (0.5, 0.75, 2.25),
    (1.0, 3.0, 2.25),
    (1.0, 3.5, 2.25),
    (1.0, 4.0, 2.25),
    (1.0, 3.5, 2.0),
    (1.0, 3.5, 2.5),
)
"""``(nu, alpha, T)`` of ``gowalla-all-users``, at the rule's k = 512."""


def gowalla_all_users() -> dict:
    """Validation NDCG@20 of the large-catalogue rule's settings around its own, as shipped
    (:data:`GOWALLA_ALL_USERS`), on every validation user: the figures of two halves of the
    users and of the whole."""
    site = gowalla_site()
    data = ranking_data(site)
    degrees = item_sum(data.rows)
    for name, part in (("training", site.train), ("validation", site.val), ("test", site.test)):
        print(f"{name} items' mean training degree {degrees[part.item].mean():.1f}", flush=True)
    everyone = np.unique(data.val.user)
    halves = {"even users": everyone[everyone % 2 == 0], "odd users": everyone[everyone % 2 == 1]}
    linear, mu, vectors, degree_scale = gowalla_spectrum(data, LARGE_CATALOGUE.rank)
    shipped = keep_top_per_row(linear, LARGE_CATALOGUE.top_per_row)
    results = {}
    for decay, alpha, time in GOWALLA_ALL_USERS:
        rule = spectral_filter(
            shipped, mu, vectors, degree_scale, alpha, data.num_items, None, time, decay
        )
        values = {half: validation_ndcg(rule, data, users=u) for half, u in halves.items()}
        sizes = {half: len(u) for half, u in halves.items()}
        whole = sum(values[h] * sizes[h] for h in halves) / sum(sizes.values())
        name = f"alpha = {alpha} n_u^-{decay}, T = {time}"
        results[name] = {"mean": whole, "spread": 0.0, "halves": values}
        print("gowalla-all-users", name, results[name], flush=True)
    return results


def bspm() -> dict:
    data = ranking_data(gowalla_site())
    value = evaluate(bspm_scorer(data, **BSPM_GOWALLA), data, "val", validation_users(data))
    return {"BSPM-EM, published settings, whole L": value[NDCG]}


def gowalla_dp(seeds: int) -> dict:
    """Where Gowalla's DP filter loses: the Gram's noise or the items it covers."""
    data = ranking_data(gowalla_site())
    users = validation_users(data)
    everyone = np.zeros(data.rows.shape[0], np.int64)
    z, n = one_release(EPSILON, 1e-6), data.num_items
    values: dict[str, list[float]] = {}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        release = released_sums(data.rows, everyone, 0.25, 10.0, 2000, z, rng)
        floor = max(1.0, release.degree_noise_std)
        degrees = release.degrees[release.items]
        gram = without_negative_entries(release.gram)  # the app's, under secure aggregation
        app = graph_filter(gram, degrees, 0.25, 1, 0.0, n, release.items, floor)
        as_released = graph_filter(release.gram, degrees, 0.25, 1, 0.0, n, release.items, floor)
        variants = {
            "the app's filter (the tuned release: 2,000 items, beta 0.25)": app,
            "the Gram as released, negative entries kept (the rule before)": as_released,
        }
        eigenvalues, eigenvectors = np.linalg.eigh(app.linear)
        for rank in (128, 512, 1024):
            top = eigenvectors[:, -rank:]
            truncated = (top * eigenvalues[-rank:]) @ top.T
            variants[f"its linear part truncated to the top {rank} eigenpairs"] = (
                dataclasses.replace(app, linear=truncated)
            )
        for name, item_filter in variants.items():
            values.setdefault(name, []).append(validation_ndcg(item_filter, data, users=users))
        print("gowalla-dp draw", seed, {k: v[-1] for k, v in values.items()}, flush=True)
    results = {name: spread(v) for name, v in values.items()}
    exact_degrees = item_sum(data.rows)
    for count in (2000, 4000, 8000):
        items = top_items(exact_degrees, count)
        gram = gram_sum(bounded_rows(data.rows[:, items], 0.5, 1.0))
        exact = graph_filter(gram, exact_degrees[items], 0.25, 1, 0.0, n, items)
        results[f"no noise, the top {count} items by exact degree"] = validation_ndcg(
            exact, data, users=users
        )
    return results


SUBSPACE_RELEASES = ((2000, 64, 2), (2000, 256, 3), (8000, 64, 2), (8000, 256, 3))
"""Covered items ``M``, rank ``k`` and iterations ``L`` of ``gowalla-dp-subspace``."""


def subspace_scorer(
    rows: sp.csr_matrix,
    items: np.ndarray,
    degree_scale: np.ndarray,
    k: int,
    iterations: int,
    noise_std: float,
    rng: np.random.Generator,
) -> Callable[[np.ndarray], np.ndarray]:
    """Scores of the filter ``D^-b Q diag(lambda / lambda_1) Q^T D^-b`` over ``items``, from
    ``iterations`` noisy releases ``W = G V + N`` of the unit-norm rows' Gram ``G``, ``V``
    the orthonormal basis of the previous ``W`` (a random one first), and the
    Rayleigh-Ritz pairs ``(lambda, Q)`` of ``sym(V^T W)`` of the last."""
    x = bounded_rows(rows[:, items], 0.5, 1.0)
    basis = np.linalg.qr(rng.normal(size=(len(items), k)))[0]
    for iteration in range(iterations):
        product = x.T @ (x @ basis) + rng.normal(0.0, noise_std, size=basis.shape)
        if iteration < iterations - 1:
            basis = np.linalg.qr(product)[0]
    ritz = basis.T @ product
    values, vectors = np.linalg.eigh((ritz + ritz.T) / 2)
    left = (basis @ vectors) / degree_scale[:, None]

    def scores(batch: np.ndarray) -> np.ndarray:
        out = np.full((len(batch), rows.shape[1]), -np.inf, np.float32)
        out[:, items] = ((rows[batch][:, items] @ left) * (values / values[-1])) @ left.T
        return out

    return scores


def gowalla_dp_subspace(seeds: int) -> dict:
    """Noisy subspace iteration instead of the Gram, at the tuned release's budget split,
    next to the app's filter of the same draw's release."""
    data = ranking_data(gowalla_site())
    users = validation_users(data)
    everyone = np.zeros(data.rows.shape[0], np.int64)
    z = one_release(EPSILON, 1e-6)
    z_gram = split_noise_multiplier(z, [0.25, 0.75])[1]
    values: dict[str, list[float]] = {}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        release = released_sums(data.rows, everyone, 0.25, 10.0, 2000, z, rng)
        floor = max(1.0, release.degree_noise_std)
        gram = without_negative_entries(release.gram)
        app = graph_filter(
            gram, release.degrees[release.items], 0.25, 1, 0.0, data.num_items, release.items, floor
        )
        name = "the app's filter (the Gram of the top 2,000 items), epsilon 8"
        values.setdefault(name, []).append(validation_ndcg(app, data, users=users))
        for count, k, iterations in SUBSPACE_RELEASES:
            items = top_items(release.degrees, count)
            if seed == 0 and iterations == 2:  # the signal the noise is up against, once
                exact = gram_sum(bounded_rows(data.rows[:, items], 0.5, 1.0), dense=False)
                values_at = -np.sort(-sla.eigsh(exact, k=256, return_eigenvectors=False))
                print(
                    f"{count} items: the Gram's eigenvalues at ranks 1, 64, 256",
                    values_at[[0, 63, 255]].round(1),
                    flush=True,
                )
            degree_scale = np.maximum(release.degrees[items], floor) ** 0.25
            if seed == 0:
                print(f"{iterations} releases: noise std {z_gram * np.sqrt(iterations):.2f}")
            for noise in (z_gram * np.sqrt(iterations), 0.0):
                scorer = subspace_scorer(data.rows, items, degree_scale, k, iterations, noise, rng)
                name = f"{count} items, k = {k}, {iterations} releases" + (
                    ", epsilon 8" if noise else ", without noise"
                )
                values.setdefault(name, []).append(evaluate(scorer, data, "val", users)[NDCG])
        print("gowalla-dp-subspace draw", seed, {k: v[-1] for k, v in values.items()}, flush=True)
    return {name: spread(v) for name, v in values.items()}


CASES: dict[str, Callable[[argparse.Namespace], dict]] = {
    "ml-no-dp": lambda args: movielens_without_dp(),
    "ml-dp": lambda args: movielens_dp(args.seeds),
    "u1": lambda args: movielens_ratings(),
    "u1-dp": lambda args: movielens_ratings_dp(args.seeds),
    "synthetic-ratings": lambda args: synthetic_ratings(),
    "cold-ratings": lambda args: cold_ratings(args.seeds),
    "gowalla": lambda args: gowalla(),
    "gowalla-second-draw": lambda args: gowalla_second_draw(),
    "gowalla-all-users": lambda args: gowalla_all_users(),
    "bspm": lambda args: bspm(),
    "gowalla-dp": lambda args: gowalla_dp(args.seeds),
    "gowalla-dp-subspace": lambda args: gowalla_dp_subspace(args.seeds),
}


def figure_of(results: dict) -> Figure:
    """One panel per case: each variant's validation figure, the first as a dashed line."""
    panels = [case for case in CASES if case in results]
    figure = Figure(figsize=(4.5 * max(len(panels), 1), 5.5))
    axes = figure.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for axis, case in zip(axes, panels, strict=False):
        names = list(results[case])
        means = [v["mean"] if isinstance(v, dict) else v for v in results[case].values()]
        axis.bar(range(len(names)), means, color="grey")
        axis.axhline(means[0], color="k", linestyle="--", label=names[0])
        axis.set_xticks(range(len(names)), names, rotation=75, ha="right")
        axis.tick_params(axis="x", labelsize=5)
        spread = max(means) - min(means) or 0.1 * abs(means[0])  # one bar: 10 % around it
        axis.set_ylim(min(means) - spread, max(means) + spread)
        axis.legend(fontsize=6)
        metric = {
            "u1": "val RMSE",
            "u1-dp": "val RMSE",
            "synthetic-ratings": "RMSE / mean's",
            "cold-ratings": "cold test RMSE",
        }
        axis.set(title=case, ylabel=metric.get(case, "val NDCG@20"))
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--seeds", type=int, default=3, help="noise draws of the DP case")
    args = parser.parse_args()
    path = RESULTS / "filter_variants.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.pop("generated", None)
    for case in args.cases:
        results[case] = CASES[case](args)
        print(case, json.dumps(results[case], indent=1), flush=True)
        print(write_results("filter_variants", results, figure_of(results)), flush=True)


if __name__ == "__main__":
    main()
