"""Model shapes, leave-one-out targets, DP-SGD in both per-sample modes, and the learned
model on the released item graph."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from test_graph_release import on_1_to_100_scale
from test_independence import released_graph

from client.train import GHOST_ABOVE_ITEMS, make_private, site_graphs, site_model, train_locally
from common.config import default_config
from common.data import load_site
from common.evaluation import evaluate
from common.graph.features import TEXT_FEATURE, GraphFeatures
from common.graph.release import rating_settings
from common.model import GRAPH_SCALE, EgoBatch
from common.privacy import site_mechanism
from common.text import item_text_vectors


def small_config(**changes):
    defaults = {"item_graph": "none", "synthetic_users": 90, "synthetic_items": 50}
    return default_config(**(defaults | {"degree_cap": 10} | changes))


def batch_of(graphs, users):
    return EgoBatch(*(torch.stack(c) for c in zip(*(graphs[u] for u in users), strict=True)))


@pytest.mark.parametrize("task", ["rating", "ranking"])
@pytest.mark.parametrize("features", [True, False])
def test_shapes(task, features):
    config = small_config(task=task, user_features=features)
    site = load_site(config, 0, 1)
    model = site_model(site.catalogue, config)
    graphs = site_graphs(site, config)
    batch = batch_of(graphs, [0, 1, 2, 3])
    assert batch.items.shape == (4, 10) and batch.features.shape[0] == 4
    assert model(batch).shape == (4,)
    score, negative = model.leave_one_out_scores(batch)
    assert score.shape == (4, 10)
    assert (negative is None) == (task == "rating")
    z, bias = model.user_vectors(batch)
    assert z.shape == (4, config.embedding_dim) and bias.shape == (4,)
    assert model.score_catalogue(z).shape == (4, site.catalogue.num_items)
    assert model.score(z, bias, batch.items).shape == (4, 10)


def test_a_target_never_sees_its_own_rating():
    """Changing the rating of edge j changes every target's score except j's own."""
    config = small_config()
    site = load_site(config, 0, 1)
    torch.manual_seed(0)
    model = site_model(site.catalogue, config)
    batch = batch_of(site_graphs(site, config), [5])
    before, _ = model.leave_one_out_scores(batch)
    j = 2
    ratings, levels = batch.ratings.clone(), batch.levels.clone()
    ratings[0, j] = 6.0 - ratings[0, j]
    levels[0, j] = 4 - levels[0, j]
    changed = dataclasses.replace(batch, ratings=ratings, levels=levels)
    after, _ = model.leave_one_out_scores(changed)
    assert torch.equal(before[0, j], after[0, j])
    others = [i for i in range(int(batch.mask.sum())) if i != j]
    assert not torch.allclose(before[0, others], after[0, others])


def test_padding_contributes_nothing():
    config = small_config(degree_cap=200)
    site = load_site(config, 0, 1)
    model = site_model(site.catalogue, config)
    graphs = site_graphs(site, config)
    batch = batch_of(graphs, [0])
    n = int(batch.mask.sum())
    trimmed = dataclasses.replace(
        batch,
        **{
            f.name: getattr(batch, f.name)[:, :n]
            for f in dataclasses.fields(batch)
            if f.name in ("items", "levels", "ratings", "mask", "context", "negatives")
        },
    )
    torch.testing.assert_close(model(batch) * 200, model(trimmed) * n)  # loss = sum / K


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("task", ["rating", "ranking"])
def test_dp_training_runs_and_accounts_every_step(mode, task):
    config = small_config(task=task, grad_sample_mode=mode, sample_rate=0.25, local_epochs=2)
    site = load_site(config, 0, 1)
    model = site_model(site.catalogue, config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mechanism = site_mechanism(config, model.size)
    result = train_locally(
        model, site_graphs(site, config), config, mechanism=mechanism, server_round=1, device="cpu"
    )
    assert result.steps == mechanism.steps_per_round == 8  # every step the ledger accounts
    assert result.mean_loss is None
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batches_are_handled_without_a_warning_each(caplog, mode):
    """With 2 users and q = 0.1 most batches are empty (a round of 10 steps without one has
    probability 0.19^10); training must still step in both per-sample modes (Opacus's ghost
    clipping failed on every such round), and Opacus's warning for an empty first batch
    (an expected event, not a fault) is not logged: at 1,000 sites of 6 users it filled
    the run's log."""
    config = small_config(
        synthetic_users=30, synthetic_items=40, degree_cap=8, grad_sample_mode=mode
    )
    site = load_site(config, 0, 10)
    assert site.num_users == 2
    model = site_model(site.catalogue, config)
    mechanism = site_mechanism(config, model.size)
    with caplog.at_level(logging.WARNING):
        result = train_locally(
            model,
            site_graphs(site, config),
            config,
            mechanism=mechanism,
            server_round=1,
            device="cpu",
        )
        opacus_log = logging.getLogger("opacus.data_loader")
        opacus_log.warning("First batch is empty. We are using a list of zero-valued tensors")
        opacus_log.warning("another warning")
    assert result.steps == 10
    assert [r.getMessage() for r in caplog.records] == ["another warning"]


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_the_clipped_sum_of_an_empty_batch_is_zero(mode):
    """Without noise, a step over no users leaves every gradient at exactly zero, in both
    modes; so with noise, the step releases the noise alone, as the accountant assumes."""
    config = small_config(grad_sample_mode=mode)
    site = load_site(config, 0, 1)
    model = site_model(site.catalogue, config)
    graphs = site_graphs(site, config)
    training = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        graphs,
        mechanism=site_mechanism(config, model.size),
        steps=1,
        grad_sample_mode=mode,
        device="cpu",
        noise_multiplier=0.0,
    )
    full = batch_of(graphs, [0, 1])
    empty = EgoBatch(
        **{
            f.name: getattr(full, f.name)[:0]
            for f in dataclasses.fields(full)
            if getattr(full, f.name) is not None
        }
    )
    training.optimizer.zero_grad(set_to_none=True)
    training.backward(empty)
    training.optimizer.pre_step()
    training.module.remove_hooks()
    for name, parameter in model.named_parameters():
        assert torch.count_nonzero(parameter.grad) == 0, name


def test_edge_dropout_removes_context_edges_in_training_only():
    config = small_config(edge_dropout=0.5, degree_cap=64)
    site = load_site(config, 0, 1)
    graphs = site_graphs(site, config)
    batch = batch_of(graphs, list(range(20)))
    assert torch.all(batch.context <= batch.mask)
    kept = batch.context.sum() / batch.mask.sum()
    assert 0.35 < float(kept) < 0.65
    context = graphs.context(list(range(20)))
    assert torch.equal(context.context, context.mask)


@pytest.mark.parametrize(("items", "ghost"), [(50, False), (GHOST_ABOVE_ITEMS + 1, True)])
def test_auto_grad_sample_mode_takes_ghost_clipping_for_large_catalogues(items, ghost):
    config = small_config(synthetic_items=items, grad_sample_mode="auto")
    site = load_site(config, 0, 1)
    model = site_model(site.catalogue, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    training = make_private(
        model,
        optimizer,
        site_graphs(site, config),
        mechanism=site_mechanism(config, model.size),
        steps=1,
        grad_sample_mode="auto",
        device="cpu",
    )
    assert isinstance(training.module, GradSampleModuleFastGradientClipping) == ghost
    training.module.remove_hooks()


def test_a_1_to_100_scale_trains_one_weighted_edge_type_on_the_reference_scale():
    config = small_config(dp=False, synthetic_users=300, local_epochs=15, learning_rate=0.02)
    site = load_site(config, 0, 1)
    wide = on_1_to_100_scale(site)
    assert (site.catalogue.edge_types, wide.catalogue.edge_types) == (5, 2)
    narrow_graphs, wide_graphs = site_graphs(site, config), site_graphs(wide, config)
    torch.testing.assert_close(wide_graphs[3][2], narrow_graphs[3][2])  # ratings seen on 1..5
    assert set(wide_graphs.levels.tolist()) == {0}

    torch.manual_seed(0)
    model = site_model(wide.catalogue, config)
    assert model.conv.out_features == 2 * config.embedding_dim
    mechanism = site_mechanism(config, model.size)
    train_locally(model, wide_graphs, config, mechanism=mechanism, server_round=1, device="cpu")
    rmse = evaluate(model, wide_graphs, wide.test, config.top_k).metrics()["rmse"]
    mean_rmse = float(np.sqrt(np.mean((wide.train.rating.mean() - wide.test.rating) ** 2)))
    assert rmse < 0.85 * mean_rmse


@pytest.mark.parametrize("task", ["ranking", "rating"])
def test_the_learned_model_starts_as_the_released_graph(task):
    """With item-graph = "filter+gcn" the score is theta . phi plus a correction that
    starts at zero, so before any training the model scores as the released graph (for
    ranking at a larger scale, which orders the items the same), its item text's part
    included."""
    config = small_config(item_graph="filter+gcn", task=task, synthetic_users=120)
    site = load_site(config, 0, 1)
    graph = released_graph(config, site)
    torch.manual_seed(0)
    model = site_model(site.catalogue, config, graph=graph).eval()
    graphs = site_graphs(site, config, graph)
    users = np.arange(12)
    text = item_text_vectors(site.catalogue, config)
    assert graph.text_weight > 0
    with torch.no_grad():
        z, user_bias = model.user_vectors(graphs.context(users))
        if task == "ranking":
            features = torch.as_tensor(graphs.features.of_catalogue(users), dtype=torch.float32)
            assert features[..., TEXT_FEATURE[task]].abs().max() > 0
            scores = model.score_catalogue(z, features) / GRAPH_SCALE["ranking"]  # same order
            expected = GraphFeatures(graph, site, rating_settings(config), text).scores(users)
            np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
            return
        pairs = site.test.select(np.isin(site.test.user, users))
        phi = graphs.features.of_pairs(pairs.user, pairs.item)
        assert np.abs(phi[:, TEXT_FEATURE[task]]).max() > 0
        rows = torch.as_tensor(pairs.user)
        phi = phi[:, None, :]
        items = torch.as_tensor(pairs.item)[:, None]
        scores = model.score(z[rows], user_bias[rows], items, torch.as_tensor(phi).float())
    expected = site.catalogue.to_reference_scale(
        GraphFeatures(graph, site, rating_settings(config), text).predict(pairs)
    )
    np.testing.assert_allclose(scores.squeeze(1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("sharpening", "alpha_decay"), [(0.0, 0.0), (0.5, 0.0), (0.5, 1.0)])
def test_a_training_targets_features_leave_the_target_out_of_the_users_row(sharpening, alpha_decay):
    """Ranking: the features of a user's own item i (and of the negative paired with it)
    are those of the user's row without i (the low-pass weight of a user with one item
    fewer too), so the model learns what it will face for an item the user has not seen;
    the text neighbours' part too."""
    config = small_config(
        item_graph="filter+gcn",
        task="ranking",
        synthetic_users=120,
        item_graph_sharpening=sharpening,
        item_graph_alpha_decay=alpha_decay,
    )
    site = load_site(config, 0, 1)
    graph = released_graph(config, site)
    text = item_text_vectors(site.catalogue, config)
    features = GraphFeatures(graph, site, rating_settings(config), text)
    similarity = features.text.toarray()
    user = 3
    items = site.train.item[site.train.user == user][:4]
    negatives = np.array([0, 5, 9, 11])
    on_targets, on_negatives = (
        part[0]
        for part in features.of_targets(
            np.array([user]), items[None], np.ones((1, 4)), negatives[None]
        )
    )
    for k, item in enumerate(items):
        rows = features.rows[[user]].toarray()
        rows[0, item] = 0.0  # the row without the target
        candidates = np.array([[item, negatives[k]]])
        expected = features.filter.features(sp.csr_matrix(rows), candidates)[0]
        text_part = features.text_scales[user] * similarity[candidates[0]] @ rows[0]
        expected = np.concatenate([expected, text_part[:, None]], 1)
        np.testing.assert_allclose(on_targets[k], expected[0], atol=1e-12)
        np.testing.assert_allclose(on_negatives[k], expected[1], atol=1e-12)
    assert np.any(on_targets[:, 2] != 0)


def test_a_training_ratings_features_are_those_of_the_graph_released_without_it():
    """Rating: a training rating's features take it back out of the user's mean, of the
    item's released offset and of the released covariance (the user's own terms of it),
    so they are close to what a graph released without that rating gives, where the
    in-sample features (the rating inside the release) are not."""
    config = small_config(item_graph="filter+gcn", task="rating", synthetic_users=120)
    site = load_site(config, 0, 1)
    settings = rating_settings(config)
    text = item_text_vectors(site.catalogue, config)
    features = GraphFeatures(released_graph(config, site), site, settings, text)
    train = site.train
    left_out, in_sample = [], []
    for row in np.flatnonzero(train.user == 3)[:6]:
        user, item = train.user[row : row + 1], train.item[row : row + 1]
        rating = site.catalogue.to_reference_scale(train.rating[row : row + 1])
        without = dataclasses.replace(site, train=train.select(np.arange(len(train)) != row))
        truth = GraphFeatures(released_graph(config, without), without, settings, text)
        expected = truth.of_pairs(user, item)[0]
        left_out.append(np.abs(features.of_pairs(user, item, rating)[0] - expected))
        in_sample.append(np.abs(features.of_pairs(user, item)[0] - expected))
    left_out, in_sample = np.mean(left_out, 0), np.mean(in_sample, 0)
    assert np.all(left_out < 0.1 * in_sample), (left_out, in_sample)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("task", ["rating", "ranking"])
def test_the_learned_model_trains_under_dp_on_the_released_graph(mode, task):
    config = small_config(
        item_graph="filter+gcn", task=task, grad_sample_mode=mode, synthetic_users=120
    )
    site = load_site(config, 0, 1)
    graph = released_graph(config, site)
    model = site_model(site.catalogue, config, graph=graph)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mechanism = site_mechanism(config, model.size)
    graphs = site_graphs(site, config, graph)
    train_locally(model, graphs, config, mechanism=mechanism, server_round=1, device="cpu")
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    metrics = evaluate(model, graphs, site.val, config.top_k).metrics()
    assert all(np.isfinite(v) for v in metrics.values())


def test_an_item_nobody_touched_is_its_text_alone_and_never_a_negative():
    """With a tenth of the items held out of training (cold), the release gives them no
    positive degree: their item vectors carry no ID embedding or offset, whatever those
    rows hold, and the ranking negatives are drawn from the touched items only."""
    config = small_config(
        item_graph="filter+gcn", task="ranking", synthetic_users=120, cold_item_fraction=0.1
    )
    site = load_site(config, 0, 1)
    graph = released_graph(config, site)
    untouched = np.flatnonzero(~graph.touched)
    assert set(site.cold_items) <= set(untouched)
    model = site_model(site.catalogue, config, graph=graph).eval()
    items = torch.as_tensor(untouched)
    with torch.no_grad():
        before = model.item_vectors(items)
        model.item_embedding.weight[items] += 5.0
        model.item_bias.weight[items] += 5.0
        after = model.item_vectors(items)
    for was, now in zip(before, after, strict=True):
        torch.testing.assert_close(was, now)
    graphs = site_graphs(site, config, graph)
    graphs.set_epoch(1)
    negatives = torch.cat([graphs[u][5] for u in range(len(graphs))]).numpy()
    assert not np.isin(negatives, untouched).any()
