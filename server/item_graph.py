"""The server's side of the item-graph phase, for either strategy.

In statistics rounds (``common.graph.release``) the server adds up the sites'
statistics (or receives their secure sum), releases what the round allows
(post-processing of the noisy total), and from then on names the release in
every instruction: its bytes travel to each site once, and again only after a
site has failed (it may have lost its copy). With ``item-graph = "filter+gcn"``
the sites then learn on it (``common.model``): the model starts as the released
graph's own score.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from common.config import RunConfig
from common.data.dataset import Catalogue
from common.graph.release import (
    ItemGraph,
    Total,
    gram_bounds,
    length,
    released,
    sensitivity,
)
from common.privacy import Mechanism
from common.protocol import (
    ITEM_GRAPH,
    ITEM_GRAPH_FINGERPRINT,
    STATISTICS,
    STATISTICS_COLUMNS,
    STATISTICS_ROWS,
)
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
        self.payload = b""  # the release as it travels, and its fingerprint
        self.fingerprint = ""
        self.sent: dict[int, str] = {}  # node id -> the release its last instruction named
        self.held: dict[int, str] = {}  # node id -> the release it has acknowledged
        self.site_degrees: dict[int, np.ndarray] = {}  # without DP: each site's round 1

    def instruction(self, node_id: int) -> dict[str, str | bytes]:
        """What node ``node_id``'s instruction carries of the graph: nothing before round
        1's release; then the release's fingerprint, with its bytes unless the node holds
        that release already (:meth:`replied`). On Gowalla the bytes are 0.5 GB, which
        every round would otherwise carry to every site."""
        if not self.fingerprint:
            return {}
        self.sent[node_id] = self.fingerprint
        named = {ITEM_GRAPH_FINGERPRINT: self.fingerprint}
        return (
            named
            if self.held.get(node_id) == self.fingerprint
            else named | {ITEM_GRAPH: self.payload}
        )

    def replied(self, node_id: int, succeeded: bool) -> None:
        """Note how node ``node_id`` answered its instruction: a success means it holds
        the release that instruction named; a failure or silence, that the next one
        carries the bytes again (the site may have lost its copy, or never received it)."""
        if succeeded and node_id in self.sent:
            self.held[node_id] = self.sent[node_id]
        else:
            self.held.pop(node_id, None)

    def expected_length(self, server_round: int) -> int:
        return length(self.config, self.catalogue, server_round, self.graph)

    def read(
        self, server_round: int, arrays: dict[str, np.ndarray], site_id: int | None = None
    ) -> Total:
        r"""A site's statistics from its reply's arrays, checked before they are added in
        (raises :class:`RejectedStatistics` with the reason): the keys and shape, finite
        values, a norm that ``max-users-per-site`` users can reach (:meth:`largest_norm`),
        and without DP, where the sums are exact, what every sum of users' terms obeys:
        non-negative ranking degrees, a Gram whose every entry is within Cauchy-Schwarz
        of its diagonal, :math:`|G_{ij}| \le \sqrt{G_{ii} G_{jj}}` (which also makes a
        sparse one symmetric with a non-negative diagonal), whose trace is at most
        :meth:`largest_traces`, and, for ranking over the whole catalogue, whose diagonal
        is consistent with the site's own round-1 degrees (:meth:`check_diagonal`)."""
        n = self.expected_length(server_round)
        if set(arrays) == {STATISTICS}:
            vector = arrays[STATISTICS]
            if vector.shape != (n,):
                raise RejectedStatistics(f"expected {n} statistics, got shape {vector.shape}")
            if not np.all(np.isfinite(vector)):
                raise RejectedStatistics("the statistics hold NaN or infinite values")
            vector = vector.astype(np.float64)
            norm, largest = float(np.linalg.norm(vector)), self.largest_norm(server_round, n)
            if norm > largest:
                raise RejectedStatistics(
                    f"the statistics' norm {norm:.4g} exceeds {largest:.4g}, the most that "
                    f"max-users-per-site = {self.config.max_users_per_site} users within "
                    "their bound (and the site's noise) can give"
                )
            if not self.config.dp:
                check_exact(self.config, server_round, vector, self.largest_traces())
                self.check_diagonal(server_round, vector, site_id)
            return vector
        sparse_keys = {STATISTICS, STATISTICS_ROWS, STATISTICS_COLUMNS}
        if set(arrays) != sparse_keys or self.config.dp or server_round != 2:
            raise RejectedStatistics(f"unexpected statistics arrays {sorted(arrays)}")
        m = len(self.graph.items)
        rows, columns = arrays[STATISTICS_ROWS], arrays[STATISTICS_COLUMNS]
        if len(rows) and (
            min(rows.min(), columns.min()) < 0 or max(rows.max(), columns.max()) >= m
        ):
            raise RejectedStatistics(f"sparse statistics outside the {m} covered items")
        values = arrays[STATISTICS].astype(np.float64)
        if not np.all(np.isfinite(values)):
            raise RejectedStatistics("the statistics hold NaN or infinite values")
        gram = sp.csr_matrix((values, (rows, columns)), shape=(m, m))
        check_cauchy_schwarz(gram.diagonal(), gram.tocoo(), self.largest_traces()[0])
        self.check_diagonal(server_round, gram.diagonal(), site_id)
        if abs(gram - gram.T).max() > 1e-6 * abs(gram).max():  # float32 rounding
            raise RejectedStatistics("the Gram is not symmetric")
        if np.linalg.norm(gram.data) > self.largest_norm(server_round, m * m):
            raise RejectedStatistics(
                "the Gram's norm exceeds what max-users-per-site users can give"
            )
        return gram

    def check_diagonal(self, server_round: int, sent: np.ndarray, site_id: int | None) -> None:
        r"""Ranking without DP, the Gram over the whole catalogue: a user adds
        :math:`r_{ui} / |N(u)|` to :math:`G_{ii}` and :math:`r_{ui} \min(1, C_d /
        \sqrt{|N(u)|})` to the degree :math:`d_i`, so a site's :math:`G_{ii}` is at most
        :math:`\max(1, 1/C_d)` times its own round-1 :math:`d_i` (kept from round 1 by site
        id); so is the co-occurrence Gram's (EASE), whose user terms :math:`x_{ui}^2 \le
        x_{ui}` are those of the degrees. ``sent``: round 1's degrees (kept), or round 2's
        isometry vector (one or two Grams) or diagonal."""
        if self.config.dp or self.config.task != "ranking" or site_id is None:
            return
        if server_round == 1:
            self.site_degrees[site_id] = sent
            return
        degrees = self.site_degrees.get(site_id)
        if degrees is None or len(self.graph.items) != len(degrees):
            return  # no round 1 of this site, or a Gram over some items only
        allowed = degrees * max(1.0, 1.0 / self.config.item_graph_degree_bound)
        grams = len(gram_bounds(self.config, self.catalogue.num_items))
        parts = np.split(sent, grams) if len(sent) > len(degrees) else [sent]
        diagonals = np.stack([part[: len(degrees)] for part in parts])
        if np.any(diagonals > allowed * (1 + 1e-6) + 1e-9):
            raise RejectedStatistics(
                "the Gram's diagonal exceeds what the site's own round-1 degrees allow"
            )

    def check_secure_sum(self, server_round: int, total: np.ndarray, sites: int) -> None:
        """Under secure aggregation the server sees only the sum of ``sites`` sites: it
        checks what holds for any honest sum (raises :class:`RejectedStatistics`): a norm
        ``sites`` honest sites can reach (each within :meth:`largest_norm`, whose noise
        term is larger than a site's share of the distributed noise). No single site can
        be named."""
        norm = float(np.linalg.norm(total))
        largest = sites * self.largest_norm(server_round, len(total))
        if norm > largest:
            raise RejectedStatistics(
                f"the secure sum's norm {norm:.4g} exceeds {largest:.4g}, the most that "
                f"{sites} sites of max-users-per-site users can give"
            )

    def largest_norm(self, server_round: int, n: int) -> float:
        r"""The largest L2 norm a site's statistics can have: ``max-users-per-site`` users,
        each moving the sum by at most the round's sensitivity :math:`\Delta`, plus,
        under DP, the site's Gaussian noise of standard deviation :math:`s`, whose norm
        exceeds :math:`s(\sqrt n + 10)` with probability below :math:`e^{-50}` (Gaussian
        concentration), so an honest site is never refused."""
        delta = sensitivity(self.config, self.catalogue, server_round)
        noise = 0.0
        if self.config.dp:
            noise = self.mechanism.statistics_noise[server_round - 1] * delta
        return self.config.max_users_per_site * delta + noise * (math.sqrt(n) + 10.0)

    def largest_traces(self) -> list[float]:
        r"""Without DP, the largest trace of each exact Gram of a site's round 2 (in
        order): :math:`\operatorname{tr} \sum_u x_u x_u^\top = \sum_u \lVert x_u
        \rVert^2`, and each user's :math:`\lVert x_u \rVert^2 = \lVert x_u x_u^\top
        \rVert_F` is at most that Gram's bound (``common.graph.release.gram_bounds``):
        ``max-users-per-site`` times it. A site that scales its Gram up by ``k`` looks
        like ``k`` times its users, never more than ``max-users-per-site``."""
        bounds = gram_bounds(self.config, self.catalogue.num_items)
        return [self.config.max_users_per_site * bound for bound in bounds]

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
        self.payload = self.graph.to_bytes()
        self.fingerprint = ItemGraph.fingerprint(self.payload)
        if self.graph.complete:
            self.out.write_item_graph(self.payload)


def check_exact(
    config: RunConfig, server_round: int, vector: np.ndarray, largest_traces: list[float]
) -> None:
    """Without DP: exact ranking degrees are non-negative, and every exact Gram of round 2
    (``common.graph.release.gram_bounds``) is within Cauchy-Schwarz of its diagonal, whose
    sum is at most its entry of ``largest_traces``. Raises :class:`RejectedStatistics`."""
    if server_round == 1:
        if config.task == "ranking" and np.any(vector < 0):
            raise RejectedStatistics("exact item degrees must be non-negative")
        return
    for part, largest_trace in zip(
        np.split(vector, len(largest_traces)), largest_traces, strict=True
    ):
        m = (math.isqrt(8 * len(part) + 1) - 1) // 2
        rows, columns = np.triu_indices(m, k=1)
        upper = sp.coo_matrix((part[m:] / math.sqrt(2.0), (rows, columns)), shape=(m, m))
        check_cauchy_schwarz(part[:m], upper, largest_trace)


def check_cauchy_schwarz(
    diagonal: np.ndarray, entries: sp.coo_matrix, largest_trace: float
) -> None:
    r"""A sum of outer products :math:`\sum_u x_u x_u^\top` of at most
    ``max-users-per-site`` users has a non-negative diagonal whose sum is at most
    ``largest_trace`` (:meth:`GraphRelease.largest_traces`), and :math:`|G_{ij}| \le
    \sqrt{G_{ii} G_{jj}}`; raise :class:`RejectedStatistics` otherwise (a relative
    tolerance of 1e-6 for rounding)."""
    if np.any(diagonal < 0):
        raise RejectedStatistics("the Gram's diagonal has a negative entry")
    trace = float(diagonal.sum())
    if trace > largest_trace * (1 + 1e-6):
        raise RejectedStatistics(
            f"the Gram's trace {trace:.4g} (the sum of its users' squared norms) exceeds "
            f"{largest_trace:.4g}, the most that max-users-per-site users can give"
        )
    limit = np.sqrt(diagonal[entries.row] * diagonal[entries.col])
    if np.any(np.abs(entries.data) > limit * (1 + 1e-6) + 1e-9):
        raise RejectedStatistics(
            "the Gram has an entry larger than its diagonal allows (|G_ij| > sqrt(G_ii G_jj))"
        )
