"""The server's side of the item-graph phase, for either strategy.

In statistics rounds (``common.graph.release``) the server adds up the sites'
statistics (or receives their secure sum), releases what the round allows
(post-processing of the noisy total), and from then on sends the release with
every instruction. With ``item-graph = "filter+gcn"`` the sites then learn on
it (``common.model``): the model starts as the released graph's own score.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from common.config import RunConfig
from common.data.dataset import Catalogue
from common.graph.release import ItemGraph, Total, length, released, sensitivity
from common.privacy import Mechanism
from common.protocol import ITEM_GRAPH, STATISTICS, STATISTICS_COLUMNS, STATISTICS_ROWS
from server.run_directory import RunDirectory


class RejectedStatistics(ValueError):
    """A site's statistics the server does not use; the message says why."""


class GraphRelease:
    """What the server has released of the item graph, and how it adds a round's sums."""

    def __init__(
        self, config: RunConfig, catalogue: Catalogue, mechanism: Mechanism, out: RunDirectory
    ) -> None:
        self.config = config
        self.catalogue = catalogue
        self.mechanism = mechanism
        self.out = out
        self.graph = ItemGraph()

    def instruction(self) -> dict[str, bytes]:
        """What every instruction carries of the graph (nothing before round 1's release)."""
        return {} if self.graph.items is None else {ITEM_GRAPH: self.graph.to_bytes()}

    def expected_length(self, server_round: int) -> int:
        return length(self.config, self.catalogue, server_round, self.graph)

    def read(self, server_round: int, arrays: dict[str, np.ndarray]) -> Total:
        """A site's statistics from its reply's arrays, checked (raises
        :class:`RejectedStatistics` with the reason)."""
        n = self.expected_length(server_round)
        if set(arrays) == {STATISTICS}:
            vector = arrays[STATISTICS]
            if vector.shape != (n,):
                raise RejectedStatistics(f"expected {n} statistics, got shape {vector.shape}")
            if not np.all(np.isfinite(vector)):
                raise RejectedStatistics("the statistics hold NaN or infinite values")
            return vector.astype(np.float64)
        sparse_keys = {STATISTICS, STATISTICS_ROWS, STATISTICS_COLUMNS}
        if set(arrays) != sparse_keys or self.config.dp or server_round != 2:
            raise RejectedStatistics(f"unexpected statistics arrays {sorted(arrays)}")
        m = len(self.graph.items)
        rows, columns = arrays[STATISTICS_ROWS], arrays[STATISTICS_COLUMNS]
        if len(rows) and (
            min(rows.min(), columns.min()) < 0 or max(rows.max(), columns.max()) >= m
        ):
            raise RejectedStatistics(f"sparse statistics outside the {m} covered items")
        return sp.csr_matrix((arrays[STATISTICS], (rows, columns)), shape=(m, m))

    def add(self, server_round: int, total: Total, sites: int) -> None:
        """Release round ``server_round`` from the ``total`` of ``sites`` sites."""
        each = 0.0
        if self.config.dp:
            noise = self.mechanism.statistics_noise[server_round - 1]
            each = noise * sensitivity(self.config, self.catalogue, server_round)
        noise_std = each if self.config.secure_aggregation else each * math.sqrt(sites)
        self.graph = released(
            self.config, self.catalogue, server_round, total, self.graph, noise_std
        )
        if self.graph.complete:
            self.out.write_item_graph(self.graph.to_bytes())
