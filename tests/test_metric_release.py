"""Metrics under DP: one user's share of a site's metric sums, the noise, the server's ratio."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_graph_release import graph_after_round_1
from test_independence import without_user

from client.site_round import SiteRound
from client.site_state import SiteState
from client.train import site_model
from common.config import default_config
from common.data import load_site
from common.evaluation import RatingErrors
from common.graph.release import ItemGraph, contribution, released
from common.metric_release import (
    evaluation_parts,
    metrics_from_sums,
    noisy_sums,
    sensitivity,
    sum_names,
    user_sums,
)


def site_round(config, site, graph: ItemGraph, tmp_path) -> SiteRound:
    return SiteRound(config, 2, "r", site, SiteState(tmp_path), graph)


def released_graph(config, site) -> ItemGraph:
    graph = graph_after_round_1(config, site)
    return released(config, site.catalogue, 2, contribution(config, site, 2, graph), graph, 0.0)


def all_sums(round_: SiteRound, model) -> np.ndarray:
    results = round_.heldout_results(model)
    return np.concatenate([user_sums(results[part]) for part in evaluation_parts(round_.config)])


CASES = {
    "graph-rating": {"task": "rating", "item_graph": "filter"},
    "graph-ranking": {"task": "ranking", "item_graph": "filter", "item_graph_items": 40},
    "learned-rating": {"task": "rating", "item_graph": "filter+gcn"},
    "model-rating-cold": {"task": "rating", "item_graph": "none", "cold_item_fraction": 0.1},
    "model-ranking-cold": {"task": "ranking", "item_graph": "none", "cold_item_fraction": 0.1},
}


@pytest.mark.parametrize("case", CASES)
def test_removing_a_user_moves_a_sites_metric_sums_by_at_most_the_sensitivity(case, tmp_path):
    """Every part at once (validation, test, cold), with the released graph or the model;
    the graph is released from the site with every user, as the federation would."""
    config = default_config(synthetic_users=120, synthetic_items=60, item_text=False, **CASES[case])
    site = load_site(config, 0, 2)
    graph = released_graph(config, site) if config.item_graph != "none" else ItemGraph()
    torch.manual_seed(0)
    model = site_model(site.catalogue, config, torch.device("cpu"), graph)
    everyone = all_sums(site_round(config, site, graph, tmp_path), model)
    assert len(everyone) == len(sum_names(config)) == 3 * len(evaluation_parts(config))
    bound = sensitivity(config)
    moved = []
    for user in range(0, site.num_users, 7):
        without = all_sums(site_round(config, without_user(site, user), graph, tmp_path), model)
        moved.append(np.linalg.norm(everyone - without))
        assert moved[-1] <= bound + 1e-9
    assert max(moved) > 0.2 * bound  # and the bound is not vacuous


def test_noise_has_the_stated_spread_and_the_server_divides_the_added_sums(tmp_path):
    config = default_config(
        task="ranking", item_graph="filter", synthetic_users=200, synthetic_items=60
    )
    site = load_site(config, 0, 1)
    model = site_model(site.catalogue, config, torch.device("cpu"))
    results = site_round(config, site, released_graph(config, site), tmp_path).heldout_results(
        model
    )
    rng = np.random.default_rng(0)
    draws = np.array([list(noisy_sums(config, results, 2.0, rng).values()) for _ in range(2000)])
    exact = np.concatenate([user_sums(results[part]) for part in evaluation_parts(config)])
    np.testing.assert_allclose(draws.std(axis=0), 2.0 * sensitivity(config), rtol=0.06)
    np.testing.assert_allclose(draws.mean(axis=0), exact, atol=0.5)
    # without noise the server's ratio is the exact metric: ranking averages over users
    noiseless = dict(zip(sum_names(config), exact.tolist(), strict=True))
    halves = [{k: v / 2 for k, v in noiseless.items()}] * 2  # two sites
    expected = {
        f"{prefix}{name}": value
        for (prefix, _), result in results.items()
        for name, value in result.metrics().items()
    }
    assert metrics_from_sums(halves) == pytest.approx(expected)


def test_rating_sums_are_released_on_the_public_scale():
    """Errors are bounded on the reference scale 1..5 and the sums scaled back: the same
    errors in stars on a 1..100 scale (24.75 points a star) give a 24.75 times larger RMSE."""
    config = default_config(synthetic_users=60, synthetic_items=30)
    errors = RatingErrors(np.array([0, 0, 1]), np.array([1.0, -1.0, 0.5]), 1.0)
    scaled = RatingErrors(np.array([0, 0, 1]), np.array([24.75, -24.75, 12.375]), 24.75)
    parts = {part: errors for part in evaluation_parts(config)}
    parts_scaled = {part: scaled for part in evaluation_parts(config)}
    plain = noisy_sums(config, parts, 1e-12, np.random.default_rng(0))
    wide = noisy_sums(config, parts_scaled, 1e-12, np.random.default_rng(0))
    ratio = metrics_from_sums([wide])["val-rmse"] / metrics_from_sums([plain])["val-rmse"]
    assert ratio == pytest.approx(24.75)
    # user 0: mean squared error 1, user 1: 0.25 -> RMSE over users sqrt(1.25 / 2)
    assert metrics_from_sums([plain])["val-rmse"] == pytest.approx(np.sqrt(1.25 / 2))
    assert metrics_from_sums([plain])["val-mae"] == pytest.approx((1.0 + 0.5) / 2)


def test_a_part_whose_noisy_user_count_is_below_one_gives_no_metric():
    sums = {"val-squared-error-sum": 3.0, "val-users": 0.4, "test-squared-error-sum": -2.0}
    assert metrics_from_sums([sums | {"test-users": 5.0}]) == {"test-rmse": 0.0}
