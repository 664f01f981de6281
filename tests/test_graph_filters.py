"""Item-item graph filters from federated sums: bounds, additivity, releases, filters."""

from __future__ import annotations

from dataclasses import replace

import dp_accounting
import numpy as np
import pytest
import scipy.sparse as sp
from dp_accounting.pld import pld_privacy_accountant

from common.accounting import Event, noise_multiplier_for
from common.data.dataset import Interactions
from common.data.synthetic import generate_synthetic
from common.graph.filters import (
    bounded_rows,
    covariance_similarity,
    ease_filter,
    gram_sum,
    graph_filter,
    item_offset_sums,
    item_offsets,
    item_sum,
    keep_top_per_row,
    mean_popularity,
    neighbourhood_residuals,
    offset_prior,
    offset_prior_terms,
    prior_design,
    prior_offsets,
    release_symmetric,
    release_vector,
    residual_rows,
    sharpening_damping,
    split_noise_multiplier,
    strongest_neighbours,
    text_components,
    top_eigenpairs,
    top_items,
    user_means,
    user_rows,
)

USERS, ITEMS = 80, 50


@pytest.fixture(scope="module")
def data():
    return generate_synthetic(USERS, ITEMS, seed=3)


@pytest.fixture(scope="module")
def binary(data):
    return user_rows(data.interactions, USERS, ITEMS)


def test_unit_rows_give_each_user_a_gram_term_of_frobenius_norm_one(binary):
    rows = bounded_rows(binary, exponent=0.5, bound=1.0)
    for u in range(USERS):
        x = rows[u].toarray().ravel()
        assert np.linalg.norm(np.outer(x, x)) == pytest.approx(1.0)
        assert x[x > 0] == pytest.approx(np.full((x > 0).sum(), 1 / np.sqrt((x > 0).sum())))


def test_degree_rows_are_capped_at_the_bound_and_exact_below_it(binary):
    rows = bounded_rows(binary, exponent=0.0, bound=4.0)
    counts = np.asarray(binary.sum(axis=1)).ravel()
    norms = np.sqrt(np.asarray(rows.multiply(rows).sum(axis=1)).ravel())
    assert norms == pytest.approx(np.minimum(np.sqrt(counts), 4.0))
    assert norms.max() == pytest.approx(4.0)  # some user has more than 16 items
    small = counts <= 16
    assert (rows[small] != binary[small]).nnz == 0


def test_removing_one_user_changes_the_sums_by_that_users_term_only(binary):
    rows = bounded_rows(binary, exponent=0.5, bound=1.0)
    degree_rows = bounded_rows(binary, exponent=0.0, bound=3.0)
    everyone = gram_sum(rows)
    degrees = item_sum(degree_rows)
    for u in (0, 17, USERS - 1):
        others = np.delete(np.arange(USERS), u)
        x, y = rows[u].toarray().ravel(), degree_rows[u].toarray().ravel()
        change = everyone - gram_sum(rows[others])
        np.testing.assert_allclose(change, np.outer(x, x), atol=1e-12)
        assert np.linalg.norm(change) <= 1.0 + 1e-12
        untouched = (x == 0)[:, None] | (x == 0)[None, :]
        assert np.abs(change[untouched]).max() < 1e-12
        degree_change = degrees - item_sum(degree_rows[others])
        np.testing.assert_allclose(degree_change, y, atol=1e-12)
        assert np.linalg.norm(degree_change) <= 3.0 + 1e-12


def test_the_sites_sums_add_up_to_the_federation_sum(binary):
    rows = bounded_rows(binary, exponent=0.5, bound=1.0)
    sites = np.array_split(np.random.default_rng(0).permutation(USERS), 4)
    np.testing.assert_allclose(sum(gram_sum(rows[s]) for s in sites), gram_sum(rows), atol=1e-12)
    np.testing.assert_allclose(sum(item_sum(rows[s]) for s in sites), item_sum(rows), atol=1e-12)


def test_restricting_to_items_keeps_the_bound(binary):
    items = top_items(item_sum(binary), 10)
    rows = bounded_rows(binary[:, items], exponent=0.5, bound=1.0)
    terms = [np.linalg.norm(np.outer(x, x)) for x in rows.toarray()]
    assert max(terms) == pytest.approx(1.0)
    assert gram_sum(rows).shape == (10, 10)


def test_top_items_are_the_largest_degrees_in_catalogue_order():
    degrees = np.array([3.0, 9.0, 1.0, 7.0, 9.0, 0.0])
    np.testing.assert_array_equal(top_items(degrees, 3), [1, 3, 4])


def test_symmetric_release_is_symmetric_with_the_stated_noise_scale():
    rng = np.random.default_rng(0)
    n, z, sensitivity = 400, 0.6, 2.0
    released = release_symmetric(np.zeros((n, n)), sensitivity, z, rng)
    np.testing.assert_array_equal(released, released.T)
    off = released[np.triu_indices(n, k=1)]
    assert np.std(np.diag(released)) == pytest.approx(z * sensitivity, rel=0.1)
    assert np.std(off) == pytest.approx(z * sensitivity / np.sqrt(2), rel=0.01)
    # The isometry: diagonal and sqrt(2) x upper triangle carry i.i.d. noise of std z * sensitivity.
    image = np.concatenate([np.diag(released), np.sqrt(2) * off])
    assert np.std(image) == pytest.approx(z * sensitivity, rel=0.01)


def test_vector_release_has_the_stated_noise_scale():
    released = release_vector(np.ones(20_000), 3.0, 0.5, np.random.default_rng(0))
    assert np.std(released) == pytest.approx(1.5, rel=0.02)
    assert np.mean(released) == pytest.approx(1.0, abs=0.05)


def one_release(epsilon: float, delta: float) -> float:
    return noise_multiplier_for(epsilon, delta, "prv", Event(0.0, 1.0, 1))


@pytest.mark.parametrize(("delta", "sigma"), [(1e-5, 0.600), (1e-6, 0.653)])
def test_one_release_at_epsilon_8_needs_the_noted_sigma(delta, sigma):
    assert one_release(8.0, delta) == pytest.approx(sigma, abs=0.002)


def test_split_releases_cost_what_one_release_costs():
    z = one_release(8.0, 1e-5)
    parts = split_noise_multiplier(z, [0.2, 0.8])
    assert sum(1 / p**2 for p in parts) == pytest.approx(1 / z**2)
    accountant = pld_privacy_accountant.PLDAccountant()
    for part in parts:
        accountant.compose(dp_accounting.GaussianDpEvent(part))
    assert accountant.get_epsilon(1e-5) == pytest.approx(8.0, abs=0.02)
    with pytest.raises(ValueError, match="sum to 1"):
        split_noise_multiplier(z, [0.5, 0.6])


def _gf_cf_by_hand(
    binary: sp.csr_matrix, k: int, alpha: float, alpha_decay: float = 0.0
) -> np.ndarray:
    """GF-CF written out densely: R~ = D_U^-1/2 R D_I^-1/2, P = R~^T R~; the low-pass part
    weighted alpha n_u^-alpha_decay, n_u the user's number of items."""
    r = binary.toarray()
    du, di = r.sum(1), np.maximum(r.sum(0), 1.0)
    normalised = r / np.sqrt(du)[:, None] / np.sqrt(di)[None, :]
    p = normalised.T @ normalised
    values, vectors = np.linalg.eigh(p)
    v = vectors[:, ::-1][:, :k]
    low_pass = (r / np.sqrt(di)) @ v @ v.T * np.sqrt(di)
    weights = alpha * du**-alpha_decay
    return r @ p / values[-1] + weights[:, None] * low_pass


@pytest.mark.parametrize("alpha_decay", [0.0, 1.0])
def test_graph_filter_scores_match_gf_cf_computed_by_hand(binary, alpha_decay):
    rows = bounded_rows(binary, exponent=0.5, bound=1.0)
    item_filter = graph_filter(
        gram_sum(rows),
        item_sum(binary),
        0.5,
        k=8,
        alpha=0.3,
        num_items=ITEMS,
        alpha_decay=alpha_decay,
    )
    expected = _gf_cf_by_hand(binary, 8, 0.3, alpha_decay)
    np.testing.assert_allclose(item_filter.scores(binary, batch_size=7), expected, atol=1e-5)
    np.testing.assert_allclose(item_filter.scores(binary.toarray()), expected, atol=1e-5)


def test_sharpening_is_one_rk4_step_of_bspms_ode_on_the_blend_within_the_basis(binary):
    """With every eigenvector kept, the sharpened score is BSPM-EM's: one classical
    Runge-Kutta step of ``ds/dt = -s L`` over the time ``T`` from the blend ``s = r_u L +
    alpha (r_u D^-1/2 V) V^T D^1/2``, computed here step by step. With a truncated basis
    ``V_k`` it is the blend times ``I - V_k diag(1 - p_T(mu)) V_k^T``; and what one item of
    a row adds to the scores (``item_features``, how a training target is left out)
    stays exact, with the low-pass weight decaying with the user's items too (the row
    without the item has one item fewer)."""
    rows = bounded_rows(binary, exponent=0.5, bound=1.0)
    degrees = item_sum(binary)
    time = 0.7
    for k in (ITEMS, 8):
        blend = graph_filter(gram_sum(rows), degrees, 0.5, k=k, alpha=0.3, num_items=ITEMS)
        sharpened = graph_filter(
            gram_sum(rows), degrees, 0.5, k=k, alpha=0.3, num_items=ITEMS, sharpening=time
        )
        start, linear, basis = blend.scores(binary), blend.linear, blend.eigenvectors
        if k == ITEMS:
            k1 = -start @ linear
            k2 = -(start + time / 2 * k1) @ linear
            k3 = -(start + time / 2 * k2) @ linear
            k4 = -(start + time * k3) @ linear
            expected = start + time / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        else:
            damping = sharpening_damping(np.diag(basis.T @ linear @ basis), time)
            expected = start - (start @ basis) * damping @ basis.T
        np.testing.assert_allclose(sharpened.scores(binary), expected, atol=1e-5)

    row = binary[[2]].toarray()  # with the truncated basis (k = 8, the loop's last)
    item = int(np.flatnonzero(row[0])[0])
    candidates = np.array([[item, 5, 9]])
    without = row.copy()
    without[0, item] = 0.0
    for decay in (0.0, 1.0):
        item_filter = replace(sharpened, alpha_decay=decay)
        weights = item_filter.low_pass_weights(row, left_out=1)
        assert weights == pytest.approx(0.3 * (row.sum() - 1) ** -decay)
        left_out = item_filter.features(row, candidates, left_out=1) - (
            item_filter.item_features(np.array([item]), candidates, weights)
        )
        expected = item_filter.features(without, candidates)
        np.testing.assert_allclose(left_out, expected, atol=1e-12)


def test_a_few_candidates_and_the_whole_catalogue_give_the_same_features(binary):
    """``features`` gathers the basis rows of a few candidates per user and multiplies
    the whole basis for many: both are the scores' parts at those items."""
    rows = bounded_rows(binary, exponent=0.5, bound=1.0)
    item_filter = graph_filter(
        gram_sum(rows), item_sum(binary), 0.5, k=8, alpha=0.3, num_items=ITEMS, sharpening=0.7
    )
    scores = item_filter.scores(binary)
    few = np.array([[3, 17, 40]] * USERS)  # 3 * 16 < 50 items: gathered
    every = np.tile(np.arange(ITEMS), (USERS, 1))
    for candidates in (few, every):
        parts = item_filter.features(binary, candidates)
        expected = np.take_along_axis(scores, candidates, axis=1)
        np.testing.assert_allclose(parts.sum(-1), expected, atol=1e-5)


def test_sparse_and_dense_paths_agree(binary):
    rows = bounded_rows(binary, exponent=0.5, bound=1.0)
    degrees = item_sum(binary)
    dense = graph_filter(gram_sum(rows), degrees, 0.5, k=5, alpha=1.0, num_items=ITEMS)
    sparse = graph_filter(
        gram_sum(rows, dense=False), degrees, 0.5, k=5, alpha=1.0, num_items=ITEMS
    )
    assert sp.issparse(sparse.linear)
    np.testing.assert_allclose(sparse.scores(binary), dense.scores(binary), atol=1e-4)
    values, _ = top_eigenpairs(sparse.linear, 5)
    assert values[0] == pytest.approx(1.0)


def test_a_filter_over_top_items_scores_only_those(binary):
    items = top_items(item_sum(binary), 20)
    rows = bounded_rows(binary[:, items], exponent=0.5, bound=1.0)
    item_filter = ease_filter(gram_sum(rows), 5.0, ITEMS, items)
    scores = item_filter.scores(binary)
    outside = np.setdiff1d(np.arange(ITEMS), items)
    assert np.isneginf(scores[:, outside]).all()
    gram = rows.T.toarray() @ rows.toarray()
    inverse = np.linalg.inv(gram + 5.0 * np.eye(20))
    weights = np.eye(20) - inverse / np.diag(inverse)
    np.testing.assert_allclose(scores[:, items], binary[:, items] @ weights, atol=1e-5)


def test_keep_top_per_row_keeps_each_rows_largest_entries():
    matrix = np.array([[5.0, 1.0, 3.0, 0.0], [0.0, 2.0, 0.0, 0.0], [1.0, 4.0, 4.5, 6.0]])
    kept = keep_top_per_row(matrix, 2).toarray()
    np.testing.assert_array_equal(
        kept, [[5.0, 0.0, 3.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 4.5, 6.0]]
    )
    tied = keep_top_per_row(np.array([[2.0, 3.0, 2.0, 2.0, 1.0]]), 3).toarray()
    np.testing.assert_array_equal(tied, [[2.0, 3.0, 2.0, 0.0, 0.0]])  # ties: first in the row
    signed = keep_top_per_row(np.array([[-5.0, 1.0, 3.0, -2.0]]), 2, magnitude=True).toarray()
    np.testing.assert_array_equal(signed, [[-5.0, 0.0, 3.0, 0.0]])


def test_strongest_neighbours_keep_each_rows_largest_magnitudes_scaled_to_sum_one():
    matrix = np.array(
        [[0.0, -4.0, 1.0, 2.0], [3.0, 0.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, -1.0, 0.0]]
    )
    ids, weights = strongest_neighbours(matrix, hops=2, count=2)
    one = np.zeros((4, 4))
    np.put_along_axis(one, ids[0], weights[0], axis=1)
    expected = [[0, -4, 0, 2], [3, 0, 3, 0], [0, 0, 0, 0], [1, 0, -1, 0]]  # ties: first column
    np.testing.assert_allclose(one, expected / np.maximum(np.abs(expected).sum(1), 1)[:, None])
    two = np.zeros((4, 4))
    for row in range(4):  # padding: item 0 at weight 0
        np.add.at(two[row], ids[1][row], weights[1][row])
    top = keep_top_per_row(one @ one, 2, magnitude=True).toarray()
    np.testing.assert_allclose(two, top / np.maximum(np.abs(top).sum(1), 1e-300)[:, None])


def test_item_offset_sums_have_the_stated_bound_and_exact_offsets_without_it(data):
    train = data.interactions
    means = user_means(train, USERS, np.zeros(ITEMS), prior=3.0, shrinkage=0.0)
    user_average = np.bincount(train.user, train.rating, USERS) / np.bincount(train.user)
    np.testing.assert_allclose(means, user_average)

    sums, counts = item_offset_sums(train, USERS, ITEMS, means, bound=np.inf)
    offsets = item_offsets(sums, counts, shrinkage=0.0)
    seen = counts > 0
    deviation = np.bincount(train.item, train.rating - means[train.user], ITEMS)
    np.testing.assert_allclose(offsets[seen], deviation[seen] / counts[seen])

    sums, counts = item_offset_sums(train, USERS, ITEMS, means, bound=1.0)
    for u in (0, 33):
        others = train.select(train.user != u)
        without = item_offset_sums(others, USERS, ITEMS, means, bound=1.0)
        change = np.concatenate([sums - without[0], counts - without[1]])
        assert np.linalg.norm(change) <= np.sqrt(2.0) + 1e-12
        assert np.linalg.norm(change[ITEMS:]) == pytest.approx(1.0)  # sqrt(|N|) >= |r - m|


def test_the_popularity_prior_is_the_weighted_fit_of_the_means_on_the_log_counts():
    counts = np.array([0.0, 1.0, 3.0, 10.0, 40.0, -0.5])
    means = -0.4 + 0.2 * np.log1p(counts)  # rarely rated items rated lower
    sums = means * counts
    prior = offset_prior(offset_prior_terms(sums, counts, noise_std=2.0).sum(0))
    np.testing.assert_allclose(prior, [-0.4, 0.2], atol=1e-12)
    same = np.full(3, 5.0)  # counts that do not vary: the weighted mean
    flat = offset_prior(offset_prior_terms(np.array([1.0, 2.0, 6.0]), same, 0.0).sum(0))
    np.testing.assert_allclose(prior_offsets(flat, same), 0.6)
    nothing = offset_prior(offset_prior_terms(np.ones(2), np.array([0.0, -1.0]), 1.0).sum(0))
    np.testing.assert_array_equal(nothing, [0.0, 0.0])


def test_the_prior_fits_the_text_components_too():
    """With covariates the prior is the weighted fit on (1, log(1 + N_i), z_i): a mean
    linear in them is recovered exactly, and an item without ratings gets its text's
    share; the components are the centred text vectors' principal coordinates."""
    rng = np.random.default_rng(0)
    text = rng.normal(size=(30, 6))
    text[:, 0] *= 5.0  # the leading direction
    components = text_components(text, 2)
    centred = text - text.mean(0)
    assert components.shape == (30, 2)
    np.testing.assert_allclose(components.mean(0), 0.0, atol=1e-12)
    assert abs(np.corrcoef(components[:, 0], centred[:, 0])[0, 1]) > 0.99
    counts = rng.integers(0, 50, 30).astype(np.float64)
    beta = np.array([-0.3, 0.1, 0.05, -0.02])
    means = prior_design(counts, components) @ beta
    prior = offset_prior(offset_prior_terms(means * counts, counts, 1.0, components).sum(0))
    np.testing.assert_allclose(prior, beta, atol=1e-10)
    offsets = item_offsets(means * counts, counts, 1.0, 4.0, prior, components)
    unrated = counts == 0
    assert unrated.any()
    np.testing.assert_allclose(offsets[unrated], means[unrated])  # the text's share


def test_an_unrated_item_can_take_the_rated_items_mean_popularity():
    """mean_popularity is the precision-weighted mean of log(1 + N_i) over rated items; an
    item without a positive count takes it in place of log(1 + 0), a rated one keeps its
    own."""
    counts = np.array([-0.5, 0.0, 3.0, 40.0])
    sums = np.array([0.3, 0.0, 0.6, -4.0])
    terms = offset_prior_terms(sums, counts, 1.0).sum(0)
    weights = counts[2:] ** 2 / (counts[2:] + 1.0)
    expected = np.sum(weights * np.log1p(counts[2:])) / weights.sum()
    assert mean_popularity(terms) == pytest.approx(expected)
    assert mean_popularity(np.zeros((2, 3))) == 0.0
    design = prior_design(counts, unrated_popularity=expected)
    np.testing.assert_allclose(design[:, 1], [expected, expected, np.log(4.0), np.log(41.0)])


def test_item_offsets_shrink_toward_the_prior():
    """b_i = p_i + (sum_i - N_i p_i) / d_i: the mean at large N_i, the prior at N_i <= 0."""
    counts = np.array([-0.5, 0.0, 2.0, 500.0])
    sums = np.array([3.0, 0.0, 1.0, 150.0])
    prior = np.array([-0.3, 0.1])
    offsets = item_offsets(sums, counts, 1.0, 4.0, prior)
    at_prior = -0.3 + 0.1 * np.log1p(np.maximum(counts, 0.0))
    np.testing.assert_allclose(offsets[:2], at_prior[:2])
    d = 2.0 + 1.0 + 4.0 / 2.0
    assert offsets[2] == pytest.approx(at_prior[2] + (1.0 - 2.0 * at_prior[2]) / d)
    assert offsets[3] == pytest.approx(0.3, abs=0.002)
    np.testing.assert_allclose(
        item_offsets(sums, counts, 1.0, 4.0), [0, 0, 1.0 / d, 150.0 / 501.008]
    )


def test_neighbourhood_prediction_averages_the_users_own_residuals(data):
    train = data.interactions
    means = user_means(train, USERS, np.zeros(ITEMS), prior=3.0, shrinkage=2.0)
    offsets = item_offsets(*item_offset_sums(train, USERS, ITEMS, means, np.inf), shrinkage=1.0)
    means = user_means(train, USERS, offsets, prior=3.0, shrinkage=2.0)
    residuals = residual_rows(train, USERS, ITEMS, means, offsets)
    assert residuals.nnz == len(train)
    covariance = gram_sum(bounded_rows(residuals, exponent=0.5, bound=1.0))
    co_counts = gram_sum(bounded_rows(user_rows(train, USERS, ITEMS), 0.5, 1.0))
    similarity = covariance_similarity(covariance, co_counts, 0.1, diagonal_floor=1e-12)
    assert np.allclose(np.diag(similarity), 0.0)
    assert np.abs(similarity).max() <= 1.0 + 1e-9
    floored = covariance_similarity(-np.eye(ITEMS) + 0.01, None, 0.0, diagonal_floor=0.25)
    assert floored[0, 1] == pytest.approx(0.01 / 0.25)

    users, items = np.array([0, 0, 5]), np.array([1, 7, 2])
    predicted = neighbourhood_residuals(similarity, residuals, users, items, 4, 0.5)
    dense = residuals.toarray()
    for j, (u, i) in enumerate(zip(users, items, strict=True)):
        rated = train.item[train.user == u]
        weight = similarity[i, rated]
        top = np.argsort(-np.abs(weight))[:4]
        expected = weight[top] @ dense[u, rated[top]] / (np.abs(weight[top]).sum() + 0.5)
        assert predicted[j] == pytest.approx(expected)


def test_user_rows_of_a_site_with_no_interactions_are_empty():
    empty = Interactions.empty()
    rows = user_rows(empty, 3, 5)
    assert rows.shape == (3, 5)
    assert rows.nnz == 0
    assert gram_sum(bounded_rows(rows, 0.5, 1.0)).sum() == 0.0
