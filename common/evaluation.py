"""Held-out evaluation of the recommender on one population of users.

- Rating task: RMSE and MAE over every held-out interaction. Predictions are
  limited to the public rating scale (a prediction of 5.3 on a 1-5 scale counts
  as 5), as is usual for MovieLens results.
- Ranking task: Recall@K and NDCG@K over the full catalogue (or over given
  candidates: cold-start items are ranked among themselves), the user's
  training items (and any other known items, e.g. validation items when
  scoring test) excluded from the ranking; averaged over users with at least
  one held-out item. PyG's ``LinkPredRecall`` / ``LinkPredNDCG`` compute them
  (LightGCN's definitions: recall divides by the user's held-out count, NDCG
  normalises by the ideal DCG of ``min(count, K)`` hits).

A user's representation is built from their training ego graph only
(:meth:`UserEgoGraphs.context`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from common.data.dataset import REFERENCE_SCALE, Interactions
from common.data.site import SiteData
from common.ego_graphs import UserEgoGraphs
from common.graph_statistics import ItemGraph, RatingNeighbourhood
from common.model import EgoBatch, EgoGraphRecommender

USERS_PER_BATCH = 256


@torch.no_grad()
def evaluate(
    model: EgoGraphRecommender,
    graphs: UserEgoGraphs,
    heldout: Interactions,
    top_k: int,
    exclude: Interactions | None = None,
    device: torch.device | str = "cpu",
    private: torch.Tensor | None = None,
    candidates: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` on ``heldout`` (users are local indices of ``graphs``).

    ``private`` is the site's table of private user embeddings, if it has one.
    ``candidates`` limits the ranking to those items (cold-start evaluation
    ranks the held-out items among themselves).

    Returns ``{"rmse", "mae"}`` for the rating task and ``{"recall@K", "ndcg@K"}``
    for ranking; empty when ``heldout`` is empty.
    """
    if len(heldout) == 0:
        return {}
    model.eval()

    def context(users: np.ndarray) -> EgoBatch:
        return graphs.context(users).with_private(private).to(device)

    if model.task == "rating":
        return _rating_metrics(model, graphs, heldout, context, device)

    def scores(users: np.ndarray) -> torch.Tensor:
        return model.score_catalogue(model.user_vectors(context(users))[0])

    return ranking_metrics(scores, graphs.item_set, heldout, top_k, exclude, candidates)


def _batches(users: np.ndarray):
    for start in range(0, len(users), USERS_PER_BATCH):
        yield users[start : start + USERS_PER_BATCH]


def _rating_metrics(model, graphs, heldout, context, device) -> dict[str, float]:
    low, high = REFERENCE_SCALE  # the model's scale; errors on the public one
    errors = []
    for batch_users in _batches(np.unique(heldout.user)):
        z, bias = model.user_vectors(context(batch_users))
        rows, mine = _in_batch(heldout, batch_users)
        items = torch.as_tensor(mine.item, device=device)
        rows = torch.as_tensor(rows, device=device)
        prediction = model.score(z[rows], bias[rows], items[:, None]).squeeze(1).clamp(low, high)
        predicted = graphs.catalogue.from_reference_scale(prediction.cpu().numpy())
        errors.append(predicted - mine.rating)
    return rating_metrics(np.concatenate(errors))


def rating_metrics(errors: np.ndarray) -> dict[str, float]:
    """RMSE and MAE of prediction errors (predictions already limited to the scale)."""
    return {"rmse": float(np.sqrt(np.mean(errors**2))), "mae": float(np.mean(np.abs(errors)))}


def evaluate_graph(
    graph: ItemGraph,
    site: SiteData,
    heldout: Interactions,
    top_k: int,
    settings: RatingNeighbourhood,
    exclude: Interactions | None = None,
    candidates: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics of a released item graph on ``heldout`` (the site's local users), as
    :func:`evaluate` computes them for a model: each user scored from their own
    training rows (``settings``: the rating predictor's)."""
    if len(heldout) == 0:
        return {}
    if graph.item_bias is not None:  # the rating task
        levels = site.catalogue.rating_levels
        prediction = np.clip(graph.predict(site, heldout, settings), levels[0], levels[-1])
        return rating_metrics(prediction - heldout.rating)
    train = site.train
    order = np.argsort(train.user, kind="stable")
    starts = np.searchsorted(train.user[order], np.arange(site.num_users + 1))

    def seen(user: int) -> np.ndarray:
        return train.item[order[starts[user] : starts[user + 1]]]

    def scores(users: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(graph.scores(site, users))

    return ranking_metrics(scores, seen, heldout, top_k, exclude, candidates)


@torch.no_grad()
def ranking_metrics(
    scores: Callable[[np.ndarray], torch.Tensor],
    seen: Callable[[int], np.ndarray],
    heldout: Interactions,
    top_k: int,
    exclude: Interactions | None = None,
    candidates: np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@K and NDCG@K of any scorer: ``scores(users)`` gives ``[B, num_items]``,
    ``seen(user)`` the items to leave out (the user's training items).

    PyG is imported here, not with the module: importing it loads ``transformers``
    too (its LLM datasets), which a process that only evaluates ratings need not pay.
    """
    from torch_geometric.metrics import LinkPredNDCG, LinkPredRecall

    recall, ndcg = LinkPredRecall(top_k), LinkPredNDCG(top_k)
    for batch_users in _batches(np.unique(heldout.user)):
        values = _leave_out(scores(batch_users).cpu(), batch_users, seen)
        if candidates is not None:
            outside = torch.ones(values.shape[1], dtype=torch.bool)
            outside[torch.as_tensor(candidates)] = False
            values[:, outside] = -torch.inf
        if exclude is not None:
            rows, mine = _in_batch(exclude, batch_users)
            values[torch.as_tensor(rows), torch.as_tensor(mine.item)] = -torch.inf
        top = values.topk(min(top_k, values.shape[1]), dim=1).indices
        rows, mine = _in_batch(heldout, batch_users)
        label_index = torch.stack([torch.as_tensor(rows), torch.as_tensor(mine.item)])
        recall.update(top, label_index)
        ndcg.update(top, label_index)
    return {f"recall@{top_k}": float(recall.compute()), f"ndcg@{top_k}": float(ndcg.compute())}


@torch.no_grad()
def recommend(
    model: EgoGraphRecommender,
    graphs: UserEgoGraphs,
    users: np.ndarray,
    k: int,
    private: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The top-``k`` items of the full catalogue for each of ``users`` (local indices),
    their own training items left out: ``[len(users), k]`` item indices."""
    model.eval()
    z, _ = model.user_vectors(graphs.context(users).with_private(private).to(device))
    return _leave_out(model.score_catalogue(z), users, graphs.item_set).topk(k, dim=1).indices


def _leave_out(
    scores: torch.Tensor, users: np.ndarray, seen: Callable[[int], np.ndarray]
) -> torch.Tensor:
    """``scores`` with each user's seen items at minus infinity (in place)."""
    for row, user in enumerate(users):
        scores[row, torch.as_tensor(seen(int(user)), device=scores.device)] = -torch.inf
    return scores


def _in_batch(
    interactions: Interactions, batch_users: np.ndarray
) -> tuple[np.ndarray, Interactions]:
    """The interactions of ``batch_users`` (sorted) and each one's row in the batch."""
    mine = interactions.select(np.isin(interactions.user, batch_users))
    return np.searchsorted(batch_users, mine.user), mine
