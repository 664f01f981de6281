"""User-level independence: the property the DP guarantee rests on.

Removing user A from a site's data (and from the batch) must leave every other
user's per-sample gradient identical, bit for bit, as Opacus computes it. If it
did not, clipping would not bound A's influence and the reported epsilon would
be wrong.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule

from client.train import USERS_PER_CHUNK, fit_private_embeddings, site_graphs, site_model
from common.config import default_config
from common.data import Interactions, load_site
from common.data.site import SiteData
from common.graph import features as features_module
from common.graph.release import ItemGraph, contribution, released
from common.model import EgoBatch


def without_user(site: SiteData, local_user: int) -> SiteData:
    """The same site with one user and all their interactions removed."""
    keep = np.delete(np.arange(site.num_users), local_user)
    new_index = np.full(site.num_users, -1)
    new_index[keep] = np.arange(len(keep))

    def drop(part: Interactions) -> Interactions:
        mine = part.select(part.user != local_user)
        return Interactions(new_index[mine.user], mine.item, mine.rating, mine.timestamp)

    return SiteData(
        site.site_id,
        site.catalogue,
        site.user_keys[keep],
        site.user_features[keep],
        drop(site.train),
        drop(site.val),
        drop(site.test),
        drop(site.cold),
        site.cold_items,
    )


def released_graph(config, site: SiteData) -> ItemGraph:
    """The item graph released from every user of ``site`` (without noise)."""
    graph = ItemGraph()
    for server_round in (1, 2):
        total = contribution(config, site, server_round, graph)
        graph = released(config, site.catalogue, server_round, total, graph, 0.0)
    return graph


def per_user_gradients(
    model, graphs, users: list[int], private: torch.Tensor | None = None
) -> dict[int, dict[str, torch.Tensor]]:
    """Opacus per-sample gradients of ``users`` (local indices), keyed by user key, of the
    batch a ``DataLoader`` fetches (``__getitems__``: the graph's features in one go)."""
    gsm = GradSampleModule(model, loss_reduction="sum")
    columns = zip(*graphs.__getitems__(users), strict=True)
    batch = EgoBatch(*(torch.stack(c) for c in columns)).with_private(private)
    gsm.zero_grad()
    gsm(batch).sum().backward()
    grads = {
        int(graphs.user_keys[u]): {
            name: p.grad_sample[row].clone() for name, p in model.named_parameters()
        }
        for row, u in enumerate(users)
    }
    gsm.remove_hooks()
    return grads


@pytest.mark.parametrize(
    ("task", "private", "item_graph", "alpha_decay"),
    [
        ("rating", False, "none", 0.0),
        ("ranking", False, "none", 0.0),
        ("rating", True, "none", 0.0),
        ("rating", False, "filter+gcn", 0.0),
        ("ranking", False, "filter+gcn", 0.0),
        ("ranking", False, "filter+gcn", 1.0),
    ],
)
def test_removing_a_user_leaves_other_users_gradients_identical(
    task, private, item_graph, alpha_decay
):
    """With ``filter+gcn`` the model learns on the released item graph: its features of a
    user and its propagation are functions of that user's own row and of released values,
    so the property holds there too (the graph is released once, from every user); the
    filter's low-pass weight of a user, from their own number of items, too."""
    config = default_config(
        item_graph=item_graph,
        item_graph_alpha_decay=alpha_decay,
        task=task,
        synthetic_users=120,
        synthetic_items=80,
        degree_cap=16,
        edge_dropout=0.25,
        private_user_embedding=private,
    )
    site = load_site(config, 0, 2)
    removed = 3
    smaller = without_user(site, removed)
    graph = released_graph(config, site) if item_graph != "none" else None
    torch.manual_seed(0)
    model = site_model(site.catalogue, config, graph=graph)
    assert (model.hops > 0) == (graph is not None)
    torch.nn.init.normal_(model.dense.weight, std=0.1)  # as after training: every path live

    graphs = site_graphs(site, config, graph)
    if graph is not None:  # the features' item text parts are live (c_u, t_ui: own row only)
        assert graphs.features.text is not None and graph.text_weight > 0
    graphs.set_epoch(7)
    graphs_without = site_graphs(smaller, config, graph)
    graphs_without.set_epoch(7)

    # Private embeddings, when configured, are per-user inputs: drop A's row too.
    table = torch.randn(site.num_users, config.embedding_dim) if private else None
    table_without = None if table is None else table[np.arange(site.num_users) != removed]

    batch = [0, 1, 2, removed, 5, 8, 13, 21]
    with_a = per_user_gradients(model, graphs, batch, table)
    batch_without = [u if u < removed else u - 1 for u in batch if u != removed]
    without_a = per_user_gradients(model, graphs_without, batch_without, table_without)

    removed_key = int(site.user_keys[removed])
    assert set(with_a) - set(without_a) == {removed_key}
    for key, grads in without_a.items():
        for name, grad in grads.items():
            assert torch.equal(grad, with_a[key][name]), (key, name)
    # The removed user really did contribute a non-zero gradient, to every parameter
    # but the user-attribute layer (the synthetic data has none)
    assert all(
        g.abs().sum() > 0 for name, g in with_a[removed_key].items() if "attributes" not in name
    )


@pytest.mark.parametrize("task", ["ranking", "rating"])
def test_a_batchs_graph_features_are_each_users_alone_bit_for_bit(task, monkeypatch):
    """The released graph's features of a batch's training targets are computed for the
    whole batch at once, a few users at a time (``TARGET_USERS``, here 3 so that a batch
    spans chunks): each user's are what that user alone gives, bit for bit."""
    monkeypatch.setattr(features_module, "TARGET_USERS", 3)
    config = default_config(
        item_graph="filter+gcn", task=task, synthetic_users=120, synthetic_items=80, degree_cap=16
    )
    site = load_site(config, 0, 2)
    graphs = site_graphs(site, config, released_graph(config, site))
    graphs.set_epoch(7)
    users = [5, 0, 13, 2, 8, 21, 1]
    batch = graphs.__getitems__(users)
    for user, sample in zip(users, batch, strict=True):
        alone = graphs[user]
        assert all(torch.equal(a, b) for a, b in zip(alone, sample, strict=True)), user
    assert any(sample[-2].abs().sum() > 0 for sample in batch)


def test_per_sample_gradients_equal_one_user_at_a_time_autograd():
    """Opacus's per-sample gradients are the gradients of each user's own loss."""
    config = default_config(
        item_graph="none", synthetic_users=60, synthetic_items=50, degree_cap=12
    )
    site = load_site(config, 0, 1)
    torch.manual_seed(1)
    model = site_model(site.catalogue, config)
    graphs = site_graphs(site, config)
    users = [0, 4, 9]
    opacus_grads = per_user_gradients(model, graphs, users)
    for u in users:
        model.zero_grad()
        batch = EgoBatch(*(x[None] for x in graphs[u]))
        model(batch).sum().backward()
        for name, p in model.named_parameters():
            expected = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(
                opacus_grads[int(graphs.user_keys[u])][name], expected, rtol=1e-5, atol=1e-6
            )


def test_private_embeddings_are_fit_from_each_users_own_data_only():
    """Refitting p_u after removing user A leaves every other user's p_u unchanged, with more
    users than one chunk of the refit, so that A's removal moves others across chunks."""
    config = default_config(
        item_graph="none",
        synthetic_users=700,
        synthetic_items=80,
        degree_cap=16,
        private_user_embedding=True,
    )
    site = load_site(config, 0, 1)
    assert site.num_users > 2 * USERS_PER_CHUNK
    removed = 4
    torch.manual_seed(0)
    model = site_model(site.catalogue, config)
    table = torch.randn(site.num_users, config.embedding_dim) * 0.1
    table_without = table[np.arange(site.num_users) != removed].clone()
    fit = {"learning_rate": config.learning_rate, "server_round": 1, "device": "cpu"}
    fit_private_embeddings(model, site_graphs(site, config), table, **fit)
    smaller = without_user(site, removed)
    fit_private_embeddings(model, site_graphs(smaller, config), table_without, **fit)
    others = np.arange(site.num_users) != removed
    assert torch.equal(table[others], table_without)
    assert all(p.requires_grad for p in model.parameters())
