"""The item-graph phase: each user's share of a site's statistics, and what the server releases."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp
from test_independence import released_graph, without_user

from common.config import default_config
from common.data import load_site
from common.data.site import SiteData
from common.errors import InputError
from common.graph.features import GraphFeatures, text_neighbours
from common.graph.filters import (
    bounded_rows,
    gram_sum,
    graph_filter,
    offset_prior,
    offset_prior_terms,
    prior_offsets,
    user_rows,
)
from common.graph.release import (
    ItemGraph,
    RankingFilter,
    contribution,
    isometry,
    length,
    prior_covariates,
    ranking_filter,
    rating_settings,
    released,
    sensitivity,
    symmetric,
    text_weight,
)
from common.text import item_text_vectors


def only_user(site: SiteData, local_user: int) -> SiteData:
    """The site with every user but one removed."""
    for other in sorted(set(range(site.num_users)) - {local_user}, reverse=True):
        site = without_user(site, other)
    return site


def graph_after_round_1(config, site) -> ItemGraph:
    total = contribution(config, site, 1, ItemGraph())
    return released(config, site.catalogue, 1, total, ItemGraph(), 0.0)


@pytest.mark.parametrize("task", ["ranking", "rating"])
@pytest.mark.parametrize("server_round", [1, 2])
def test_one_user_moves_a_sites_sums_by_their_own_bounded_term_only(task, server_round):
    config = default_config(task=task, synthetic_users=120, synthetic_items=60, item_graph_items=40)
    site = load_site(config, 0, 2)
    graph = ItemGraph() if server_round == 1 else graph_after_round_1(config, site)
    everyone = contribution(config, site, server_round, graph)
    assert everyone.shape == (length(config, site.catalogue, server_round, graph),)
    bound = sensitivity(config, site.catalogue, server_round)
    norms = []
    for user in (0, 7, site.num_users - 1):
        change = everyone - contribution(config, without_user(site, user), server_round, graph)
        alone = contribution(config, only_user(site, user), server_round, graph)
        np.testing.assert_allclose(change, alone, atol=1e-9)  # nobody else's term moved
        norms.append(np.linalg.norm(alone))
        assert norms[-1] <= bound + 1e-9
    assert max(norms) > 0.3 * bound  # and the bound is not vacuous


@pytest.mark.parametrize("task", ["ranking", "rating"])
@pytest.mark.parametrize("server_round", [1, 2])
def test_a_repeated_user_item_row_is_refused_where_the_users_row_is_built(task, server_round):
    """The audit found a duplicated (user, item) row moving the rating round-1 sum by 2.0
    against a bound of 1.414: the loaders reject duplicates, but the statistics must not
    trust their caller."""
    config = default_config(task=task, synthetic_users=60, synthetic_items=40)
    site = load_site(config, 0, 2)
    graph = ItemGraph() if server_round == 1 else graph_after_round_1(config, site)
    first = np.flatnonzero(site.train.user == 0)[0]
    repeated = site.train.select(np.append(np.arange(len(site.train)), first))
    with pytest.raises(ValueError, match="1 repeated \\(user, item\\) pair"):
        contribution(config, replace(site, train=repeated), server_round, graph)


def test_the_gram_travels_as_an_isometry_of_its_frobenius_norm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 7))
    matrix = a + a.T
    vector = isometry(matrix)
    assert len(vector) == 7 * 8 // 2
    assert np.linalg.norm(vector) == pytest.approx(np.linalg.norm(matrix))
    np.testing.assert_allclose(symmetric(vector), matrix)


def test_the_released_graph_travels_as_bytes_dense_or_sparse():
    graph = ItemGraph(
        items=np.arange(4),
        degrees=np.ones(4),
        linear=sp.csr_matrix(np.eye(4)),
        eigenvectors=np.ones((4, 2)),
        alpha=0.5,
        input_scale=np.ones(4),
        output_scale=np.ones(4),
    )
    again = ItemGraph.from_bytes(graph.to_bytes())
    assert again.complete and again.alpha == 0.5 and sp.issparse(again.linear)
    assert (again.linear != graph.linear).nnz == 0
    np.testing.assert_array_equal(again.eigenvectors, graph.eigenvectors)
    assert ItemGraph.from_bytes(ItemGraph().to_bytes()).items is None


def test_the_ratings_symmetric_parts_travel_as_upper_triangles_exactly():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 300))
    covariance = symmetric(isometry(a + a.T))
    graph = ItemGraph(items=np.arange(300), covariance=covariance, co_counts=covariance**2)
    payload = graph.to_bytes()
    again = ItemGraph.from_bytes(payload)
    np.testing.assert_array_equal(again.covariance, covariance)
    np.testing.assert_array_equal(again.co_counts, covariance**2)
    assert len(payload) < 0.55 * 2 * covariance.nbytes  # half of the two matrices


def test_large_catalogues_send_an_exact_sparse_gram_without_dp_only():
    config = default_config(
        task="ranking", dp=False, synthetic_users=100, item_graph_dense_items=10
    )
    site = load_site(config, 0, 1)
    graph = graph_after_round_1(config, site)
    gram = contribution(config, site, 2, graph)
    assert sp.issparse(gram) and gram.shape == (len(graph.items),) * 2
    dp_config = default_config(task="ranking", synthetic_users=100, item_graph_dense_items=10)
    assert isinstance(contribution(dp_config, site, 2, graph), np.ndarray)


def test_the_ranking_filter_scores_only_the_covered_items():
    config = default_config(task="ranking", dp=False, synthetic_users=150, item_graph_items=30)
    site = load_site(config, 0, 1)
    graph = graph_after_round_1(config, site)
    assert len(graph.items) == 30
    graph = released(config, site.catalogue, 2, contribution(config, site, 2, graph), graph, 0.0)
    scores = GraphFeatures(graph, site, rating_settings(config)).scores(np.arange(5))
    covered = np.zeros(site.catalogue.num_items, bool)
    covered[graph.items] = True
    assert np.isfinite(scores[:, covered]).all() and np.isneginf(scores[:, ~covered]).all()


@pytest.mark.parametrize("weight", [0.0, 0.3])
def test_the_ranking_score_adds_the_item_texts_part_at_a_share_of_the_filters_spread(weight):
    """The graph's score of a user is the filter's plus the text part c_u r_u T^T over the
    covered items, c_u = gamma sigma(filter) / sigma(r_u T^T): the text part's spread over
    the covered items is gamma times the filter's, for every user (none at gamma = 0)."""
    config = default_config(
        task="ranking",
        dp=False,
        synthetic_users=120,
        item_graph="filter",
        item_graph_items=40,
        item_graph_text_weight=weight,
    )
    site = load_site(config, 0, 1)
    graph = graph_after_round_1(config, site)
    graph = released(config, site.catalogue, 2, contribution(config, site, 2, graph), graph, 0.0)
    assert graph.text_weight == weight
    text = item_text_vectors(site.catalogue, config)
    users = np.arange(8)
    scores = GraphFeatures(graph, site, rating_settings(config), text).scores(users)
    rows = user_rows(site.train, site.num_users, site.catalogue.num_items)[users]
    filter_scores = graph.item_filter.scores(rows)
    text_part = (scores - filter_scores)[:, graph.items]
    np.testing.assert_array_equal(np.isneginf(scores), np.isneginf(filter_scores))
    spread = filter_scores[:, graph.items].std(1)
    np.testing.assert_allclose(text_part.std(1), weight * spread, rtol=1e-4, atol=1e-6)
    sums = (rows @ text_neighbours(text)[graph.items].T).toarray()  # r_u T^T
    if weight:
        correlation = [np.corrcoef(a, b)[0, 1] for a, b in zip(text_part, sums, strict=True)]
        assert min(correlation) > 0.9999


@pytest.mark.parametrize("weight", [0.0, 1.5])
def test_the_rating_prediction_adds_the_text_neighbourhood_of_the_users_residuals(weight):
    """A rating prediction adds gamma t_ui: the mean of the user's own residuals on their
    rated items nearest to the item by text, weighted by T, over the 50 largest weights
    and damped by 10 (the same mean as the covariance neighbourhood's, public weights)."""
    config = default_config(
        task="rating", dp=False, synthetic_users=120, item_graph_text_weight=weight
    )
    site = load_site(config, 0, 1)
    graph = released_graph(config, site)
    assert graph.text_weight == weight
    text = item_text_vectors(site.catalogue, config)
    settings = rating_settings(config)
    features = GraphFeatures(graph, site, settings, text)
    without_text = GraphFeatures(graph, site, settings)
    pairs = site.test.select(site.test.user < 6)
    added = site.catalogue.to_reference_scale(features.predict(pairs)) - (
        site.catalogue.to_reference_scale(without_text.predict(pairs))
    )
    similarity = text_neighbours(text).toarray()
    for p in range(len(pairs)):
        residuals = features.residuals[pairs.user[p]]
        weights = similarity[pairs.item[p], residuals.indices]
        kept = np.argsort(-np.abs(weights))[: settings.text_neighbours]
        mean = (
            weights[kept]
            @ residuals.data[kept]
            / (np.abs(weights[kept]).sum() + settings.text_damping)
        )
        np.testing.assert_allclose(added[p], weight * mean, rtol=1e-5, atol=1e-7)
    assert weight == 0 or np.abs(added).max() > 0


@pytest.mark.parametrize(
    ("task", "dp", "expected"),
    [
        ("ranking", False, 0.05),
        ("ranking", True, 0.3),
        ("rating", False, 1.0),
        ("rating", True, 1.5),
    ],
)
def test_the_text_parts_weight_is_a_rule_of_the_task_and_dp_or_the_key(task, dp, expected):
    assert text_weight(default_config(task=task, dp=dp)) == expected
    assert text_weight(default_config(task=task, dp=dp, item_graph_text_weight=2)) == 2.0


def test_the_graph_ranks_by_released_degrees_after_round_1_and_for_a_user_without_rows():
    """MostPop by the released degrees: the run's baseline (round 1), and the filter's
    score for a new user, whose empty row the filter cannot rank by."""
    config = default_config(task="ranking", dp=False, synthetic_users=150)
    site = load_site(config, 0, 1)
    first = graph_after_round_1(config, site)
    scores = GraphFeatures(first, site, rating_settings(config)).scores(np.arange(3))
    np.testing.assert_allclose(scores, np.tile(first.degrees, (3, 1)), rtol=1e-6)
    graph = released(config, site.catalogue, 2, contribution(config, site, 2, first), first, 0.0)
    new = replace(site, train=site.train.select(site.train.user != 0))  # user 0: no rows
    scores = GraphFeatures(graph, new, rating_settings(config)).scores(np.arange(2))
    np.testing.assert_allclose(scores[0], graph.degrees, rtol=1e-6)
    assert not np.allclose(scores[1], graph.degrees)


@pytest.mark.parametrize(
    ("dp", "items", "expected"),
    [
        (False, 1682, RankingFilter(None, 0.25, 16, 1.0, None, ease_weight=3.0, text_weight=0.05)),
        (
            False,
            40981,
            RankingFilter(
                None, 0.5, 512, 3.5, 1000, sharpening=2.25, alpha_decay=1.0, text_weight=0.05
            ),
        ),
        (True, 1682, RankingFilter(400, 0.25, 16, 1.0, None, text_weight=0.3)),
        (True, 40981, RankingFilter(2000, 0.25, 16, 1.0, None, text_weight=0.3)),
        (True, 60, RankingFilter(None, 0.25, 16, 1.0, None, text_weight=0.3)),
    ],
)
def test_auto_ranking_filter_is_a_rule_of_the_catalogue_size_and_dp(dp, items, expected):
    assert ranking_filter(default_config(task="ranking", dp=dp), items) == expected
    keys = default_config(
        task="ranking", dp=dp, item_graph_items=0, item_graph_rank=8, item_graph_text_weight=1
    )
    assert ranking_filter(keys, items) == replace(expected, items=None, rank=8, text_weight=1)
    if dp:
        secure = default_config(task="ranking", dp=True, secure_aggregation=True)
        assert ranking_filter(secure, items) == replace(expected, nonnegative=True)


def test_under_secure_aggregation_the_filter_is_the_released_grams_with_negatives_at_zero():
    """The noise on the federation's sum makes some Gram entries negative; the Gram of
    non-negative rows has none, so under secure aggregation the filter is computed from
    the released Gram with those entries set to zero, and from the Gram as released with
    per-site noise."""
    config = default_config(
        task="ranking", dp=True, synthetic_users=120, synthetic_items=60, item_graph_items=0
    )
    site = load_site(config, 0, 2)
    graph = graph_after_round_1(config, site)
    total = contribution(config, site, 2, graph)
    total = total + np.random.default_rng(0).normal(0.0, 0.5, total.shape)
    gram = symmetric(total)
    assert (gram < 0).any()
    for secure, expected_gram in ((False, gram), (True, np.maximum(gram, 0.0))):
        run = replace(config, secure_aggregation=secure)
        linear = released(run, site.catalogue, 2, total, graph, 0.5).linear
        expected = graph_filter(expected_gram, graph.degrees, 0.25, 16, 1.0, 60, floor=1.0)
        np.testing.assert_allclose(linear, expected.linear)


def test_without_dp_round_2_adds_the_co_occurrence_gram_whose_ease_weights_join_the_filter():
    """The EASE part: round 2 also sums the users' round-1 degree rows' Gram (each user
    within the degree bound squared), and the released linear part is the filter's plus
    EASE's weights of it, scaled to the spectral norm ``item-graph-ease-weight``."""
    config = default_config(
        task="ranking", dp=False, synthetic_users=120, synthetic_items=60,
        item_graph_degree_bound=2.0,
    )  # fmt: skip
    site = load_site(config, 0, 2)
    graph = graph_after_round_1(config, site)
    total = contribution(config, site, 2, graph)
    assert total.shape == (length(config, site.catalogue, 2, graph),) == (2 * 60 * 61 // 2,)
    degree_rows = bounded_rows(user_rows(site.train, site.num_users, 60), 0.0, 2.0)
    np.testing.assert_allclose(symmetric(np.split(total, 2)[1]), gram_sum(degree_rows))
    bound = sensitivity(config, site.catalogue, 2)
    assert bound == pytest.approx(np.hypot(1.0, 4.0))
    for user in (0, 7, site.num_users - 1):
        alone = contribution(config, only_user(site, user), 2, graph)
        change = total - contribution(config, without_user(site, user), 2, graph)
        np.testing.assert_allclose(change, alone, atol=1e-9)
        assert np.linalg.norm(alone) <= bound + 1e-9
    with_ease = released(config, site.catalogue, 2, total, graph, 0.0).linear
    plain_config = replace(config, item_graph_ease_weight=0.0)
    plain = contribution(plain_config, site, 2, graph)
    assert len(plain) == len(total) // 2
    plain_linear = released(plain_config, site.catalogue, 2, plain, graph, 0.0).linear
    gram = symmetric(np.split(total, 2)[0])
    expected = graph_filter(gram, graph.degrees, 0.25, 16, 1.0, 60, floor=1.0).linear
    np.testing.assert_allclose(plain_linear, expected)
    ease_part = with_ease - plain_linear
    assert np.linalg.norm(ease_part, 2) == pytest.approx(3.0)
    assert np.allclose(np.diag(ease_part), 0.0)  # EASE never scores an item by itself


def test_ease_is_refused_by_name_where_its_gram_cannot_be_released():
    for config in (
        default_config(task="ranking", dp=True, item_graph_ease_weight=1.0),
        default_config(
            task="ranking", dp=False, item_graph_ease_weight=1.0, item_graph_dense_items=10
        ),
    ):
        with pytest.raises(InputError, match="item-graph-ease-weight: EASE's part needs"):
            ranking_filter(config, 60)
    with pytest.raises(InputError, match="item-graph-ease-ridge: expected"):
        default_config(task="ranking", item_graph_ease_ridge=0)


def test_the_rank_is_at_most_the_covered_items_cut_by_the_rule_refused_when_set():
    sparse = default_config(task="ranking", dp=False, item_graph_dense_items=10)
    assert ranking_filter(sparse, 60).rank == 60  # the large-catalogue rule's 512, cut
    with pytest.raises(InputError, match="item-graph-rank: 100 eigenvectors of a graph over 60"):
        ranking_filter(sparse.replace(item_graph_rank=100), 60)


@pytest.mark.parametrize("value", ["many", -1])
def test_an_item_graph_setting_is_auto_or_a_number_in_range(value):
    with pytest.raises(InputError, match='item-graph-rank: expected "auto" or a number'):
        default_config(task="ranking", item_graph_rank=value)


def on_1_to_100_scale(site: SiteData) -> SiteData:
    """The site with its 1..5 ratings mapped linearly onto a scale of quarter points from
    1 to 100 (397 levels)."""
    assert site.catalogue.rating_levels == (1.0, 2.0, 3.0, 4.0, 5.0)

    def mapped(part):
        return replace(part, rating=1.0 + (part.rating - 1.0) * 99 / 4)

    levels = tuple(float(x) for x in np.arange(1.0, 100.25, 0.25))
    catalogue = replace(site.catalogue, rating_levels=levels)
    return replace(site, catalogue=catalogue, train=mapped(site.train), test=mapped(site.test))


@pytest.mark.parametrize("dp", [False, True])
def test_ratings_on_a_1_to_100_scale_give_the_same_release_and_predictions_mapped(dp):
    config = default_config(task="rating", dp=dp, synthetic_users=200, synthetic_items=60)
    site = load_site(config, 0, 1)
    wide = on_1_to_100_scale(site)
    graph, wide_graph = ItemGraph(), ItemGraph()
    for server_round in (1, 2):
        total = contribution(config, site, server_round, graph)
        np.testing.assert_allclose(contribution(config, wide, server_round, wide_graph), total)
        graph = released(config, site.catalogue, server_round, total, graph, 0.5 * dp)
        wide_graph = released(config, wide.catalogue, server_round, total, wide_graph, 0.5 * dp)
    settings = rating_settings(config)
    predicted = GraphFeatures(graph, site, settings).predict(site.test)
    wide_predicted = GraphFeatures(wide_graph, wide, settings).predict(wide.test)
    np.testing.assert_allclose(wide_predicted, 1.0 + (predicted - 1.0) * 99 / 4)
    rmse = np.sqrt(np.mean((wide_predicted - wide.test.rating) ** 2))
    mean_rmse = np.sqrt(np.mean((wide.train.rating.mean() - wide.test.rating) ** 2))
    assert rmse < 0.85 * mean_rmse


def test_round_1_releases_the_users_mean_rating_that_users_means_shrink_toward():
    """Users' means were shrunk toward the middle of the scale; they now shrink toward the
    released global mean (the users' mean ratings averaged)."""
    config = default_config(dp=False, synthetic_users=120, synthetic_items=60)
    site = load_site(config, 0, 1)
    graph = graph_after_round_1(config, site)
    ratings = site.catalogue.to_reference_scale(site.train.rating)
    counts = np.bincount(site.train.user, minlength=site.num_users)
    means = np.bincount(site.train.user, ratings, site.num_users) / counts
    assert graph.global_mean == pytest.approx(means.mean())
    assert abs(graph.global_mean - 3.0) > 0.05  # not the middle of the scale
    users = contribution(config, site, 2, graph)  # round 2 shrinks toward it
    middle = contribution(config, site, 2, replace(graph, global_mean=None))
    assert not np.allclose(users, middle)


def test_item_offsets_shrink_by_the_noise_on_their_counts():
    """b_i = p_i + (sum_i - N_i p_i) / (N_i + lambda + kappa sigma^2 / N_i): the noisier the
    counts, the more every offset shrinks toward its prior (fitted on the released sums,
    counts and item texts' principal components, or zero);
    an item whose released count is not positive has its prior alone."""
    config = default_config(task="rating", synthetic_users=120, synthetic_items=60)
    site = load_site(config, 0, 1)
    n = site.catalogue.num_items
    total = contribution(config, site, 1, ItemGraph())
    total[n] = -0.5  # a count the noise took below zero
    app = rating_settings(config)
    shrinkage, kappa = app.item_shrinkage, app.count_noise_shrinkage
    counts = total[n : 2 * n]
    for settings in (replace(app, popularity_prior=False), app):
        spread = {}
        for sigma in (0.1, 4.0):
            graph = released(config, site.catalogue, 1, total, ItemGraph(), sigma, settings)
            at_prior = np.zeros(n)
            if settings.popularity_prior:  # the fit on the released sums, counts and texts
                covariates = prior_covariates(config, site.catalogue, settings)
                assert covariates.shape == (n, settings.text_prior_components)
                np.testing.assert_array_equal(graph.item_covariates, covariates)
                terms = offset_prior_terms(total[:n], counts, sigma, covariates)
                prior = offset_prior(terms.sum(0))
                np.testing.assert_array_equal(graph.item_prior, prior)
                assert prior[1] != 0.0
                at_prior = prior_offsets(prior, counts, covariates)
            d = counts + shrinkage + kappa * sigma**2 / counts
            expected = at_prior + (total[:n] - counts * at_prior) / d
            np.testing.assert_allclose(graph.item_bias[1:], expected[1:])
            assert graph.item_bias[0] == at_prior[0]
            spread[sigma] = np.abs(graph.item_bias - at_prior)[1:]
        if not settings.popularity_prior:  # the same prior, zero, under both noises
            assert np.all(spread[4.0] < spread[0.1])


@pytest.mark.parametrize("dp", [True, False])
def test_a_training_ratings_offset_is_the_noisy_release_without_its_term(dp):
    """The learned model's training features take a rating's own term out of the noisy
    release: the offset is what the same noisy sums give without the term (without DP
    the prior gives an unrated item the rated items' mean popularity, refitted too)."""
    config = default_config(task="rating", synthetic_users=120, synthetic_items=60, dp=dp)
    site = load_site(config, 0, 1)
    n, sigma = site.catalogue.num_items, 0.7
    noisy = contribution(config, site, 1, ItemGraph())
    noisy += np.random.default_rng(0).normal(0.0, sigma, noisy.shape)
    graph = released(config, site.catalogue, 1, noisy, ItemGraph(), sigma)
    sent = GraphFeatures(graph, site, rating_settings(config)).sent
    lone = site.train.item[5]  # its count is row 5's weight alone: left out, it is unrated
    noisy[n + lone] = sent.first_weights[site.train.user[5]]
    graph = released(config, site.catalogue, 1, noisy, ItemGraph(), sigma)
    features = GraphFeatures(graph, site, rating_settings(config))
    assert (graph.item_unrated_popularity is None) == dp
    for row in (0, 5, 17, 40):
        user, item = site.train.user[row : row + 1], site.train.item[row : row + 1]
        rating = site.catalogue.to_reference_scale(site.train.rating[row : row + 1])
        weight = sent.first_weights[user[0]]
        without = noisy.copy()
        without[item[0]] -= weight * (rating[0] - sent.first_means[user[0]])
        without[n + item[0]] -= weight
        expected = released(config, site.catalogue, 1, without, ItemGraph(), sigma).item_bias
        offset = features.of_pairs(user, item, rating)[0, 1]
        assert offset == pytest.approx(expected[item[0]], abs=1e-12)
        assert offset != pytest.approx(graph.item_bias[item[0]], abs=1e-6)


def test_a_graph_with_parts_this_version_does_not_read_is_refused_by_name():
    """A release written by another version (here: an earlier one's ``similarity``) is
    refused with the part's name, not read as an incomplete graph."""
    buffer = io.BytesIO()
    np.savez(buffer, items=np.arange(3), similarity=np.zeros((3, 3)))
    with pytest.raises(InputError, match="holds similarity"):
        ItemGraph.from_bytes(buffer.getvalue())
