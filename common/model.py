r"""The recommender: a shared item side and a per-user ego-graph encoder.

Every parameter of :class:`EgoGraphRecommender` is *item side*: it is shared by
all sites, trained under DP-SGD and aggregated by the server. What is private to
a user (their interactions, attributes, and the closed-form user bias) enters
only as input, so a user's representation is a function of that user's own
data and of shared parameters. This is what makes one user's per-sample
gradient independent of every other user (see ``docs`` in the README and
``tests/test_independence.py``).

Notation: :math:`N(u)` is the set of items user :math:`u` interacted with
(capped at ``degree_cap`` by the data pipeline), :math:`r_{ui}` the rating
level of the interaction, :math:`x_u` the user's attribute vector.

**Item representation** (shared): the row of the item embedding table plus,
when the catalogue has text and ``item-text`` is on, a learned projection of
the item's text vector :math:`t_i` (``common.text``; public, fixed):

.. math::
    q_i = e_i + P\, t_i, \qquad b_i = b^{\text{id}}_i + w^\top t_i

:math:`P` and :math:`w` are one linear layer, shared and trained under DP like
the rest. An item nobody has interacted with still gets :math:`P t_i` and
:math:`w^\top t_i` from its text: that is what makes cold-start items
recommendable.

**Ego-graph convolution** (one GC-MC layer on the star graph of :math:`u`;
edge type = rating level; the item's degree in the ego graph is 1, so the
symmetric normalisation :math:`1/\sqrt{d_u d_i}` is the user's own degree):

.. math::
    h_u = \frac{1}{\sqrt{|N(u)|}} \sum_{i \in N(u)} W_{r_{ui}}\, q_i

A scale of more than ``MAX_EDGE_TYPES`` levels (``common.data.dataset``) gets one
edge type weighted by the rating instead of a weight matrix per level:
:math:`W_{r_{ui}} = W_0 + \tilde r_{ui} W_1`, with :math:`\tilde r_{ui} \in [-1, 1]`
the rating's place on the scale. Ratings are seen on the reference scale 1..5
(``Catalogue.to_reference_scale``) and predictions mapped back, so a 1..100 scale
trains like a 1..5 one.

A second convolution on a star graph would only send :math:`h_u` back to the
user; multi-hop signal reaches a user through the item embeddings, which the
federation trains on every site's users.

**Dense layer** with the user's attributes (GC-MC's side-information path),
plus an optional private embedding :math:`p_u` that never leaves the user's
site and is not trained by DP-SGD (``client.train.fit_private_embeddings``):

.. math::
    z_u = W_d \big[\operatorname{ReLU}(h_u) \,\|\, \operatorname{ReLU}(W_a x_u)\big]
          \;(+\, p_u)

**Score**: :math:`s_{ui} = z_u^\top q_i + b_i + b_u`. For the rating task
:math:`b_i = \mu + b^{\text{id}}_i (+ w^\top t_i)` holds a shared global bias
:math:`\mu` (initialised at the middle of the rating scale: one coordinate
that every user's gradient reaches, so DP noise hurts it least) and the item's
own offset; :math:`b_u` is the user bias, computed by the user's site in
closed form from the user's own residuals and the released item biases (never
a trained parameter):

.. math::
    b_u = \frac{\sum_{i \in N(u)} (r_{ui} - b_i)}{\lambda + |N(u)|}

**On the released item graph** (``graph_features`` :math:`G > 0`, ``item-graph =
"filter+gcn"``): the score adds :math:`\theta^\top \phi_{ui}`, the released graph's
features of the user and item (``common.graph.features.GraphFeatures``), and the
rest of the model is a correction of it: :math:`W_d` and the item offsets start at
zero and :math:`\theta` at :data:`GRAPH_SCALE`, so that before training the model
scores as the graph (its item text's part included); the global bias and the
closed-form user bias give way to the graph's own user mean and item offset (rating).
For ranking, BPR is applied to the whole score and to the correction alone (with the
text neighbours' part): the graph already orders most pairs, and the second term
keeps the correction a ranker of its own, which is all there is for an item the graph
has never seen (cold start). Such an item, one the release says nobody touched
(``ItemGraph.touched``, :meth:`EgoGraphRecommender.set_touched`), has no ID embedding
or offset: it is its text alone, and it is never drawn as a negative.

**Training targets, leave-one-out.** During training every interaction of the
user is a target, and its own edge is removed from the ego graph when it is
scored (:math:`N(u) \setminus \{i\}` in both formulas above), so the model never
sees the rating it predicts. Rating task: squared error. Ranking task: BPR
against one negative per positive drawn uniformly from the public catalogue.
The loss of a user is the sum over that user's targets divided by the degree
cap, and each user is one sample for Opacus.

Every layer is called once per forward pass on a batch-first tensor, so the
module works with Opacus's ``hooks`` and ``ghost`` per-sample gradient modes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.config import RunConfig
from common.data.dataset import REFERENCE_SCALE, Catalogue
from common.graph.features import FEATURE_NAMES, TEXT_FEATURE
from common.graph.propagation import Propagation
from common.text import text_dimension

ITEM_ROW_PARAMETERS = ("item_embedding.weight", "item_bias.weight")
"""Parameters with one row per catalogue item (averaged row by row without DP)."""


@dataclass
class EgoBatch:
    r"""A batch of users' ego graphs, padded to a fixed ``degree_cap`` K.

    Attributes:
        items: ``[B, K]`` item index of each edge (0 where padded).
        levels: ``[B, K]`` rating-level index of each edge.
        ratings: ``[B, K]`` rating value of each edge (1.0 for implicit data).
        mask: ``[B, K]`` 1.0 for real edges (the targets), 0.0 for padding.
        context: ``[B, K]`` 1.0 for the edges that form the ego graph: the real
            edges minus those removed by edge dropout (training only).
        negatives: ``[B, K]`` one negative item per edge (ranking task only).
        features: ``[B, F]`` user attributes (``F`` may be 0).
        users: ``[B]`` the users' local indices at their site.
        graph: ``[B, K, G]`` the released graph's features :math:`\phi` of each edge's
            item with that edge left out (``common.graph.features.GraphFeatures``), or
            ``None`` without an item graph.
        graph_negatives: ``[B, K, G]`` the same for each edge's negative (ranking).
        private: ``[B, d]`` the users' private embeddings :math:`p_u`, or ``None``.
    """

    items: Tensor
    levels: Tensor
    ratings: Tensor
    mask: Tensor
    context: Tensor
    negatives: Tensor
    features: Tensor
    users: Tensor
    graph: Tensor | None = None
    graph_negatives: Tensor | None = None
    private: Tensor | None = None

    def with_private(self, table: Tensor | None) -> EgoBatch:
        """This batch with its users' rows of a private embedding table (``None``: none)."""
        return self if table is None else replace(self, private=table[self.users])

    def to(self, device: torch.device | str) -> EgoBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return EgoBatch(**{k: None if v is None else v.to(device) for k, v in moved.items()})


GRAPH_SCALE = {"rating": 1.0, "ranking": 30.0}
""":math:`\theta` at the start: the graph's own score (rating), or its ranking at a scale
where BPR's loss saturates on the pairs the graph already orders well, so that the
correction learns from the graph's mistakes (ranking; 1, 10 and 30 tried on the
validation split of MovieLens-100K implicit, by an exploration whose script is not in
the repository)."""


class EgoGraphRecommender(nn.Module):
    """See the module docstring for the formulas.

    Args:
        num_items: size of the public catalogue.
        edge_types: ``Catalogue.edge_types``: one per rating level (one for implicit
            data), or two for a wide scale (a plain and a rating-weighted edge).
        dim: embedding and hidden size.
        num_user_features: length of the user attribute vector (0: none).
        task: ``"rating"`` (squared error) or ``"ranking"`` (BPR).
        user_bias_shrinkage: :math:`\\lambda` of the closed-form user bias
            (rating task); ``None`` turns the user bias off.
        text_dim: size of the item text vectors (0: no item text).
        graph_features: :math:`G`, the released item graph's features per user and item
            (``common.graph.features.GraphFeatures``; 0: no item graph). With them the
            model is a residual on the graph: see the module docstring.
    """

    def __init__(
        self,
        num_items: int,
        edge_types: int,
        dim: int,
        num_user_features: int,
        task: str,
        user_bias_shrinkage: float | None,
        text_dim: int = 0,
        graph_features: int = 0,
    ) -> None:
        super().__init__()
        if task not in ("rating", "ranking"):
            raise ValueError(f"task must be 'rating' or 'ranking', got {task!r}")
        self.task = task
        self.dim = dim
        self.edge_types = edge_types
        self.weighted_edges = edge_types == 2
        self.user_bias_shrinkage = user_bias_shrinkage if task == "rating" else None

        self.item_embedding = nn.Embedding(num_items, dim)
        self.item_bias = nn.Embedding(num_items, 1)
        self.conv = nn.Linear(dim, edge_types * dim, bias=False)
        self.attributes = nn.Linear(num_user_features, dim) if num_user_features else None
        self.dense = nn.Linear(2 * dim if num_user_features else dim, dim)
        self.item_text_projection = nn.Linear(text_dim, dim + 1, bias=False) if text_dim else None
        self.use_text = text_dim > 0
        self.register_buffer("item_touched", None, False)  # every item's ID part (set_touched)

        nn.init.normal_(self.item_embedding.weight, std=0.1)
        nn.init.zeros_(self.item_bias.weight)
        self.global_bias = nn.Embedding(1, 1) if task == "rating" and not graph_features else None
        if self.global_bias is not None:
            nn.init.constant_(self.global_bias.weight, sum(REFERENCE_SCALE) / 2)
        self.graph_weights = nn.Linear(graph_features, 1, bias=False) if graph_features else None
        if self.graph_weights is not None:  # the residual on the graph starts as the graph
            with torch.no_grad():  # theta: the graph's parts at their scale
                self.graph_weights.weight.fill_(GRAPH_SCALE[task])
            nn.init.zeros_(self.dense.weight)
            nn.init.zeros_(self.dense.bias)
            if self.item_text_projection is not None:
                nn.init.zeros_(self.item_text_projection.weight[-1])  # the text's item bias
            self.user_bias_shrinkage = None  # the graph's user mean is a feature
        self.hops = 0

    @property
    def size(self) -> int:
        """How many numbers the item side (the whole state dict) holds."""
        return sum(v.numel() for v in self.state_dict().values())

    def set_item_text(self, vectors: Tensor) -> None:
        """The public text vectors ``[num_items, text_dim]`` (a buffer: never sent)."""
        self.register_buffer("item_text", vectors.to(self.item_embedding.weight), persistent=False)

    def set_touched(self, touched: np.ndarray) -> None:
        """Keep the ID embedding and offset only for the items the released graph says someone
        touched (``ItemGraph.touched``; a buffer: public, never sent): any other item, which
        training never sees, is its text alone."""
        weight = self.item_embedding.weight
        self.register_buffer("item_touched", torch.as_tensor(touched).to(weight), False)

    def set_propagation(self, propagation: Propagation) -> None:
        """Propagate item representations over the released item graph (buffers: public,
        never sent): ``propagation.neighbours`` and ``.weights`` ``[H, num_items, M]``,
        and ``.text`` ``[H, num_items, text_dim]`` when the model reads item text."""
        weight = self.item_embedding.weight
        self.hops = propagation.neighbours.shape[0]
        self.register_buffer("neighbours", propagation.neighbours.to(weight.device), False)
        self.register_buffer("neighbour_weights", propagation.weights.to(weight), False)
        if propagation.text is not None:
            self.register_buffer("propagated_text", propagation.text.to(weight), False)

    @contextmanager
    def text_disabled(self) -> Iterator[None]:
        """Score without the text term and the text neighbours' part, e.g. to see what
        text adds for cold items."""
        self.use_text = False
        try:
            yield
        finally:
            self.use_text = self.item_text_projection is not None

    def item_vectors(self, items: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(q_i, b_i)`` of ``items`` (any shape): one call of each item-side layer.

        With propagation, :math:`q_i` is the mean over hops :math:`k = 0..H` of the
        item's neighbourhood :math:`\sum_j (\hat P^k)_{ij} x_j` of
        :math:`x_j = e_j + P t_j` (the item itself at :math:`k = 0`)."""
        ids, weights = items[..., None], torch.ones_like(items, dtype=torch.float)[..., None]
        if self.hops:
            around = (self.neighbours[:, items], self.neighbour_weights[:, items])
            ids = torch.cat([ids, around[0].movedim(0, -2).flatten(-2)], -1)
            weights = torch.cat([weights, around[1].movedim(0, -2).flatten(-2)], -1)
        # Opacus's ghost clipping reads an embedding's input as [B, T]: flatten the hops
        embedded = self.item_embedding(ids.flatten(-2)).unflatten(-2, ids.shape[-2:])
        b = self.item_bias(items).squeeze(-1)
        if self.item_touched is not None:
            weights, b = weights * self.item_touched[ids], b * self.item_touched[items]
        q = (embedded * weights[..., None]).sum(-2) / (self.hops + 1)
        if self.global_bias is not None:
            b = b + self.global_bias(torch.zeros_like(items)).squeeze(-1)
        if self.item_text_projection is None or not self.use_text:
            return q, b
        vectors = self.item_text[items][..., None, :]
        if self.hops:
            vectors = torch.cat([vectors, self.propagated_text[:, items].movedim(0, -2)], -2)
        text = self.item_text_projection(vectors.flatten(-3, -2)).unflatten(
            -2, vectors.shape[-3:-1]
        )
        return q + text[..., :-1].sum(-2) / (self.hops + 1), b + text[..., 0, -1]

    def graph_score(self, graph: Tensor | None) -> Tensor | float:
        r""":math:`\theta^\top \phi` of the released graph's features (0 without); with
        the text disabled, without the text neighbours' part."""
        if self.graph_weights is None:
            return 0.0
        if not self.use_text:
            text = TEXT_FEATURE[self.task]
            graph = graph * (torch.arange(graph.shape[-1], device=graph.device) != text)
        return self.graph_weights(graph).squeeze(-1)

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups: weight decay on the embedding tables (item offsets included:
        it pulls items with little signal back from DP noise) and weight matrices; none
        on the global bias, which carries the mean rating, nor on layer biases."""
        decayed = [
            p
            for n, p in self.named_parameters()
            if n.endswith("weight") and not n.startswith("global_bias")
        ]
        others = [p for n, p in self.named_parameters() if not any(p is d for d in decayed)]
        return [
            {"params": decayed, "weight_decay": weight_decay},
            {"params": others, "weight_decay": 0.0},
        ]

    def _messages(self, q: Tensor, batch: EgoBatch) -> Tensor:
        """``W_{r_ui} q_i`` for every edge: one Linear call, then pick the level (or, with
        weighted edges, ``W_0 q_i + r~_ui W_1 q_i``)."""
        per_type = self.conv(q).unflatten(-1, (self.edge_types, self.dim))
        if self.weighted_edges:
            place = (batch.ratings - sum(REFERENCE_SCALE) / 2) / (
                (REFERENCE_SCALE[1] - REFERENCE_SCALE[0]) / 2
            )
            return per_type[..., 0, :] + place[..., None] * per_type[..., 1, :]
        index = batch.levels[..., None, None].expand(*batch.levels.shape, 1, self.dim)
        return per_type.gather(-2, index).squeeze(-2)

    def _user_vector(self, h: Tensor, batch: EgoBatch) -> Tensor:
        """The dense layer, plus the private embedding; ``h`` is ``[B, d]`` or ``[B, K, d]``."""
        h = F.relu(h)
        if self.attributes is not None:
            a = F.relu(self.attributes(batch.features))
            if h.dim() == 3:
                a = a[:, None, :].expand(-1, h.shape[1], -1)
            h = torch.cat([h, a], dim=-1)
        z = self.dense(h)
        if batch.private is None:
            return z
        return z + (batch.private[:, None, :] if z.dim() == 3 else batch.private)

    def forward(self, batch: EgoBatch) -> Tensor:
        """Per-user training loss, shape ``[B]``: the sum over the user's targets / K.

        Dividing by the fixed cap K rather than the user's own count weighs
        interactions equally up to the cap (as RMSE over interactions does), and
        keeps every user's loss on one scale.
        """
        score, score_negative = self.leave_one_out_scores(batch)
        graph, graph_negative = 0.0, 0.0
        if self.graph_weights is not None:  # one call of the layer (ghost clipping)
            k = batch.items.shape[1]
            both = [batch.graph] + ([batch.graph_negatives] if self.task == "ranking" else [])
            if self.task == "ranking":  # and the text neighbours' part alone, for the correction
                text_only = torch.zeros_like(batch.graph)
                text_only[..., TEXT_FEATURE["ranking"]] = 1.0
                both += [batch.graph * text_only, batch.graph_negatives * text_only]
            scores = self.graph_score(torch.cat(both, 1))
            graph, graph_negative = scores[:, :k], scores[:, k : 2 * k]
        if self.task == "rating":
            per_target = (score + graph - batch.ratings) ** 2
        else:
            per_target = -F.logsigmoid(score + graph - score_negative - graph_negative)
            if self.graph_weights is not None:  # the correction alone ranks too (see above)
                text, text_negative = scores[:, 2 * k : 3 * k], scores[:, 3 * k :]
                per_target = per_target - F.logsigmoid(
                    score + text - score_negative - text_negative
                )
        return (per_target * batch.mask).sum(1) / batch.mask.shape[1]

    def leave_one_out_scores(self, batch: EgoBatch) -> tuple[Tensor, Tensor | None]:
        """Score of every edge ``(u, i)`` with the edge itself removed from the ego graph,
        without the released graph's term (:meth:`forward` adds it).

        Returns ``[B, K]`` scores of the edges' items and, for the ranking task,
        ``[B, K]`` scores of their paired negatives under the same user vector.
        """
        k = batch.items.shape[1]
        ranking = self.task == "ranking"
        ids = torch.cat([batch.items, batch.negatives], 1) if ranking else batch.items
        q_all, b_all = self.item_vectors(ids)
        q, b = q_all[:, :k], b_all[:, :k]
        context = batch.context

        messages = self._messages(q, batch) * context[..., None]
        rest = context.sum(1, keepdim=True) - context  # |N(u) \ {i}| for every target i
        h = (messages.sum(1, keepdim=True) - messages) / rest.clamp(min=1).sqrt()[..., None]
        z = self._user_vector(h, batch)  # [B, K, d]

        score = (z * q).sum(-1) + b
        if ranking:
            return score, (z * q_all[:, k:]).sum(-1) + b_all[:, k:]
        if self.user_bias_shrinkage is not None:
            residual = (batch.ratings - b.detach()) * context
            score = score + (residual.sum(1, keepdim=True) - residual) / (
                self.user_bias_shrinkage + rest
            )
        return score, None

    def user_vectors(
        self, batch: EgoBatch, vectors: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(z_u, b_u)`` from the user's whole ego graph, for scoring unseen items;
        ``vectors``: :meth:`catalogue_vectors`, when the caller keeps them.

        Returns ``z`` of shape ``[B, d]`` and the user bias ``[B]`` (zeros when
        the task or configuration has none).
        """
        if vectors is None:
            q, b = self.item_vectors(batch.items)
        else:
            q, b = vectors[0][batch.items], vectors[1][batch.items]
        context = batch.context
        messages = self._messages(q, batch) * context[..., None]
        degree = context.sum(1)
        h = messages.sum(1) / degree.clamp(min=1).sqrt()[:, None]
        z = self._user_vector(h, batch)
        if self.user_bias_shrinkage is None:
            return z, torch.zeros_like(degree)
        residual = ((batch.ratings - b) * context).sum(1)
        return z, residual / (self.user_bias_shrinkage + degree)

    def score(
        self, z: Tensor, user_bias: Tensor, items: Tensor, graph: Tensor | None = None
    ) -> Tensor:
        """Scores of ``items`` (``[B, T]``) for users ``(z, user_bias)``, with the released
        graph's features ``graph`` ``[B, T, G]`` of the pairs (item graph only)."""
        q, b = self.item_vectors(items)
        return (z[:, None, :] * q).sum(-1) + b + user_bias[:, None] + self.graph_score(graph)

    def catalogue_vectors(self) -> tuple[Tensor, Tensor]:
        """``(q_i, b_i)`` of every catalogue item (:meth:`item_vectors`)."""
        weight = self.item_embedding.weight
        return self.item_vectors(torch.arange(weight.shape[0], device=weight.device))

    def score_catalogue(
        self,
        z: Tensor,
        graph: Tensor | None = None,
        vectors: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Scores of every catalogue item, ``[B, num_items]`` (no user bias), with the
        released graph's features ``graph`` ``[B, num_items, G]`` (item graph only);
        ``vectors``: :meth:`catalogue_vectors`, when the caller keeps them."""
        q, b = self.catalogue_vectors() if vectors is None else vectors
        return z @ q.T + b + self.graph_score(graph)


def build_model(
    catalogue: Catalogue, config: RunConfig, text_vectors: np.ndarray | None = None
) -> EgoGraphRecommender:
    """The recommender for ``catalogue`` as configured (weights from ``torch``'s RNG).

    With item text on, whoever scores items passes the catalogue's text vectors
    (``common.text.item_text_vectors``); the server, which only averages
    parameters, need not.
    """
    uses_text = config.item_text and catalogue.item_text is not None
    model = EgoGraphRecommender(
        num_items=catalogue.num_items,
        edge_types=catalogue.edge_types,
        dim=config.embedding_dim,
        num_user_features=len(catalogue.user_feature_names) if config.user_features else 0,
        task=config.task,
        user_bias_shrinkage=config.user_bias_shrinkage if config.user_bias else None,
        text_dim=text_dimension(config.text_model) if uses_text else 0,
        graph_features=len(FEATURE_NAMES[config.task]) if config.item_graph == "filter+gcn" else 0,
    )
    if uses_text and text_vectors is not None:
        model.set_item_text(torch.from_numpy(text_vectors))
    return model


def item_side_size(catalogue: Catalogue, config: RunConfig) -> int:
    """How many numbers the item side holds (the length of a site's secure-sum vector)."""
    return build_model(catalogue, config).size
