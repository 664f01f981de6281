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

import numpy as np
import torch
from torch_geometric.metrics import LinkPredNDCG, LinkPredRecall

from common.data.dataset import Interactions
from common.ego_graphs import UserEgoGraphs
from common.model import EgoGraphRecommender

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
    users = np.unique(heldout.user)
    user_batches = [users[s : s + USERS_PER_BATCH] for s in range(0, len(users), USERS_PER_BATCH)]
    contexts = (graphs.context(b).with_private(private).to(device) for b in user_batches)
    batches = zip(user_batches, contexts, strict=True)
    if model.task == "rating":
        return _rating_metrics(model, graphs, heldout, batches, device)
    return _ranking_metrics(model, graphs, heldout, batches, top_k, exclude, device, candidates)


def _rating_metrics(model, graphs, heldout, batches, device) -> dict[str, float]:
    low, high = graphs.rating_range
    squared, absolute = 0.0, 0.0
    for batch_users, context in batches:
        z, bias = model.user_vectors(context)
        rows, mine = _in_batch(heldout, batch_users)
        items = torch.as_tensor(mine.item, device=device)
        rows = torch.as_tensor(rows, device=device)
        prediction = model.score(z[rows], bias[rows], items[:, None]).squeeze(1).clamp(low, high)
        error = prediction - torch.as_tensor(mine.rating, device=device)
        squared += float((error**2).sum())
        absolute += float(error.abs().sum())
    return {"rmse": (squared / len(heldout)) ** 0.5, "mae": absolute / len(heldout)}


def _ranking_metrics(
    model, graphs, heldout, batches, top_k, exclude, device, candidates
) -> dict[str, float]:
    recall, ndcg = LinkPredRecall(top_k).to(device), LinkPredNDCG(top_k).to(device)
    outside = None
    if candidates is not None:
        outside = torch.ones(model.item_embedding.num_embeddings, dtype=torch.bool, device=device)
        outside[torch.as_tensor(candidates, device=device)] = False
    for batch_users, context in batches:
        z, _ = model.user_vectors(context)
        scores = model.score_catalogue(z)
        if outside is not None:
            scores[:, outside] = -torch.inf
        for row, user in enumerate(batch_users):
            scores[row, torch.as_tensor(graphs.item_set(int(user)), device=device)] = -torch.inf
        if exclude is not None:
            rows, mine = _in_batch(exclude, batch_users)
            scores[torch.as_tensor(rows), torch.as_tensor(mine.item)] = -torch.inf
        top = scores.topk(min(top_k, scores.shape[1]), dim=1).indices
        rows, mine = _in_batch(heldout, batch_users)
        label_index = torch.stack([torch.as_tensor(rows), torch.as_tensor(mine.item)]).to(device)
        recall.update(top, label_index)
        ndcg.update(top, label_index)
    return {f"recall@{top_k}": float(recall.compute()), f"ndcg@{top_k}": float(ndcg.compute())}


def _in_batch(
    interactions: Interactions, batch_users: np.ndarray
) -> tuple[np.ndarray, Interactions]:
    """The interactions of ``batch_users`` (sorted) and each one's row in the batch."""
    mine = interactions.select(np.isin(interactions.user, batch_users))
    return np.searchsorted(batch_users, mine.user), mine
