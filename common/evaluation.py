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

:func:`evaluate` and :func:`evaluate_graph` return what they found
(:class:`RatingErrors`, :class:`RankingSums`), from which ``.metrics()`` gives
the exact metrics and ``common.metric_release`` the per-user sums that a site
releases with noise under ``evaluation = "dp"``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from common.data.dataset import REFERENCE_SCALE, Catalogue, Interactions
from common.data.site import SiteData
from common.ego_graphs import UserEgoGraphs
from common.graph.features import GraphFeatures
from common.graph.release import ItemGraph, RatingNeighbourhood
from common.model import EgoBatch, EgoGraphRecommender

USERS_PER_BATCH = 256


@dataclass(frozen=True)
class RatingErrors:
    """The errors of a rating evaluation.

    Attributes:
        users: the (local) user of each held-out rating.
        errors: prediction (limited to the public scale) minus rating, on the public scale.
        unit: one step of :data:`REFERENCE_SCALE` on the public scale (errors divided by
            it are on the reference scale).
    """

    users: np.ndarray
    errors: np.ndarray
    unit: float

    def metrics(self) -> dict[str, float]:
        """RMSE and MAE over every held-out rating (empty when there is none)."""
        return rating_metrics(self.errors) if len(self.errors) else {}


@dataclass(frozen=True)
class RankingSums:
    """The per-user metrics of a ranking evaluation, summed over the users ranked.

    Attributes:
        top_k: K.
        recall, ndcg: the sums over users of Recall@K and NDCG@K (each in [0, 1]).
        users: the number of users with at least one held-out item.
    """

    top_k: int
    recall: float
    ndcg: float
    users: int

    def metrics(self) -> dict[str, float]:
        """Recall@K and NDCG@K averaged over users (empty when no user was ranked)."""
        if not self.users:
            return {}
        k = self.top_k
        return {f"recall@{k}": self.recall / self.users, f"ndcg@{k}": self.ndcg / self.users}


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
) -> RatingErrors | RankingSums:
    """The evaluation of ``model`` on ``heldout`` (users are local indices of ``graphs``).

    ``private`` is the site's table of private user embeddings, if it has one.
    ``candidates`` limits the ranking to those items (cold-start evaluation
    ranks the held-out items among themselves).
    """
    if len(heldout) == 0:
        return _nothing_held_out(model.task, top_k, graphs.catalogue)
    model.eval()

    def context(users: np.ndarray) -> EgoBatch:
        return graphs.context(users).with_private(private).to(device)

    if model.task == "rating":
        return _rating_errors(model, graphs, heldout, context, device)

    vectors = model.catalogue_vectors()  # once: the item side does not change here

    def scores(users: np.ndarray) -> torch.Tensor:
        graph = _graph_features(graphs, device, users)
        z = model.user_vectors(context(users), vectors)[0]
        return model.score_catalogue(z, graph, vectors)

    return ranking_sums(scores, graphs.item_set, heldout, top_k, exclude, candidates)


def _graph_features(
    graphs: UserEgoGraphs,
    device: torch.device | str,
    users: np.ndarray,
    items: np.ndarray | None = None,
) -> torch.Tensor | None:
    """The released graph's features of ``users`` for every catalogue item, or of the pairs
    ``(users, items)`` as ``[P, 1, G]`` (``None`` without an item graph)."""
    if graphs.features is None:
        return None
    if items is None:
        features = graphs.features.of_catalogue(users)
    else:
        features = graphs.features.of_pairs(users, items)[:, None, :]
    return torch.as_tensor(features, dtype=torch.float32, device=device)


def _nothing_held_out(task: str, top_k: int, catalogue: Catalogue) -> RatingErrors | RankingSums:
    if task == "rating":
        empty = np.zeros(0)
        return RatingErrors(empty.astype(np.int64), empty, catalogue.reference_unit)
    return RankingSums(top_k, 0.0, 0.0, 0)


def _batches(users: np.ndarray):
    for start in range(0, len(users), USERS_PER_BATCH):
        yield users[start : start + USERS_PER_BATCH]


def _rating_errors(model, graphs, heldout, context, device) -> RatingErrors:
    low, high = REFERENCE_SCALE  # the model's scale; errors on the public one
    users, errors = [], []
    for batch_users in _batches(np.unique(heldout.user)):
        z, bias = model.user_vectors(context(batch_users))
        rows, mine = _in_batch(heldout, batch_users)
        items = torch.as_tensor(mine.item, device=device)
        rows = torch.as_tensor(rows, device=device)
        graph = _graph_features(graphs, device, mine.user, mine.item)
        prediction = model.score(z[rows], bias[rows], items[:, None], graph)
        prediction = prediction.squeeze(1).clamp(low, high)
        predicted = graphs.catalogue.from_reference_scale(prediction.cpu().numpy())
        users.append(mine.user)
        errors.append(predicted - mine.rating)
    unit = graphs.catalogue.reference_unit
    return RatingErrors(np.concatenate(users), np.concatenate(errors), unit)


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
    text: np.ndarray | None = None,
) -> RatingErrors | RankingSums:
    """The evaluation of a released item graph on ``heldout`` (the site's local users), as
    :func:`evaluate` does it for a model: each user scored from their own training rows
    (``settings``: the rating predictor's; ``text``: the catalogue's text vectors, for the
    ranking score's text part)."""
    task = "rating" if graph.item_bias is not None else "ranking"
    if len(heldout) == 0:
        return _nothing_held_out(task, top_k, site.catalogue)
    features = GraphFeatures(graph, site, settings, text)
    if task == "rating":
        prediction = site.catalogue.limited(features.predict(heldout))
        unit = site.catalogue.reference_unit
        return RatingErrors(heldout.user, prediction - heldout.rating, unit)
    train = site.train
    order = np.argsort(train.user, kind="stable")
    starts = np.searchsorted(train.user[order], np.arange(site.num_users + 1))

    def seen(user: int) -> np.ndarray:
        return train.item[order[starts[user] : starts[user + 1]]]

    def scores(users: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(features.scores(users))

    return ranking_sums(scores, seen, heldout, top_k, exclude, candidates)


@torch.no_grad()
def ranking_sums(
    scores: Callable[[np.ndarray], torch.Tensor],
    seen: Callable[[int], np.ndarray],
    heldout: Interactions,
    top_k: int,
    exclude: Interactions | None = None,
    candidates: np.ndarray | None = None,
) -> RankingSums:
    """Recall@K and NDCG@K of any scorer, summed over users: ``scores(users)`` gives
    ``[B, num_items]``, ``seen(user)`` the items to leave out (the user's training items).

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
    # PyG keeps the sum of each user's value (accum) and the users with a label (total)
    return RankingSums(top_k, float(recall.accum), float(ndcg.accum), int(recall.total))


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
