r"""The released item graph as the GCN propagates over it.

Once released, the item-item graph is public, so propagating over it couples
no users: an item's representation after :math:`k` hops is a function of the
released graph, the shared weights and the item text alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from common.graph.filters import strongest_neighbours
from common.graph.release import ItemGraph


@dataclass(frozen=True)
class Propagation:
    r"""The released item graph as the model propagates over it: per hop :math:`k = 1..H`,
    each item's ``M`` strongest neighbours in :math:`\hat P^k` and their weights
    (``[H, num_items, M]``; a row's absolute weights sum to 1, or are all 0 for an item
    with no neighbour), and the item text vectors propagated the same way
    (``[H, num_items, text_dim]``, or ``None``)."""

    neighbours: Tensor
    weights: Tensor
    text: Tensor | None


GCN_NEIGHBOURS = 10
"""How many neighbours of an item each propagation hop keeps (``Propagation``)."""


def propagation(
    graph: ItemGraph, num_items: int, hops: int, text: np.ndarray | None
) -> Propagation:
    """The released ``graph`` as the model propagates over it: each item's
    ``GCN_NEIGHBOURS`` strongest neighbours per hop, and the ``text`` vectors propagated
    over the same neighbours (a public function of released values)."""
    neighbours, weights = _strongest_neighbours(graph, num_items, hops)
    propagated = None
    if text is not None:
        rows = np.repeat(np.arange(num_items), neighbours.shape[2])
        hops_text = [
            sp.csr_matrix((w.ravel(), (rows, ids.ravel())), shape=(num_items, num_items)) @ text
            for ids, w in zip(neighbours, weights, strict=True)
        ]
        propagated = torch.from_numpy(np.stack(hops_text).astype(np.float32))
    return Propagation(
        torch.from_numpy(neighbours), torch.from_numpy(weights.astype(np.float32)), propagated
    )


@lru_cache(maxsize=2)
def _strongest_neighbours(
    graph: ItemGraph, num_items: int, hops: int
) -> tuple[np.ndarray, np.ndarray]:
    """Computed once per release and process (15 s for Gowalla's 41M-entry filter; a
    ClientApp process serves every message of the run with the same release)."""
    return strongest_neighbours(graph.propagation_matrix(num_items), hops, GCN_NEIGHBOURS)
