r"""Item-side aggregation, with every site update checked before use.

Sites send back the item-side parameters after local training. The default
(``item-side-aggregation = "auto"``, ``RunConfig.aggregation``) is the
coordinate-wise trimmed mean over the sites (Flower's FedTrimmedAvg kernel,
``aggregate_trimmed_avg``; Yin et al., ICML 2018): each coordinate's highest and
lowest site value are dropped and the rest averaged, so one malicious site among
``S >= 3`` is cut or lies inside the honest sites' range, whatever it sends, and
claims of weight (counts) play no part. With fewer than 3 sites it is the plain
mean. Under DP it is post-processing of the sites' released updates and changes
no epsilon:

.. math::
    \theta_j \leftarrow \frac{1}{S - 2} \sum_{s=2}^{S-1} \theta_{(s),j}
    \quad (\theta_{(1),j} \le \dots \le \theta_{(S),j})

``"median"`` (Flower's FedMedian kernel, ``aggregate_median``) keeps every
coordinate within the honest sites' values as long as most sites are honest, but
on a large sparse catalogue, where most item rows are untouched at most sites, it
moves them far less than the mean (``simulations/poisoning.py --cases
aggregation``):

.. math::
    \theta_j \leftarrow \operatorname{median}_s\, \theta_{s,j}

``"mean"`` is federated averaging. With DP on, every site has the same weight
(a count of users or interactions would be private):

.. math::
    \theta \leftarrow \frac{1}{S} \sum_{s=1}^{S} \theta_s

With DP off, each item row is averaged with the sites' interaction counts for
that item (rows no site touched keep their global value) and every other
parameter with the sites' user counts:

.. math::
    e_i \leftarrow \frac{\sum_s c_{si}\, e_{si}}{\sum_s c_{si}}, \qquad
    W \leftarrow \frac{\sum_s n_s W_s}{\sum_s n_s}

Under secure aggregation the server sees only the sum, so only the mean is
possible (``server.secure_aggregation``).

An update with missing or unexpected keys, a wrong shape or dtype, a NaN or
infinite value, or counts beyond what ``max-users-per-site`` users can have (each
user counts once per item) is rejected with a logged reason; the round goes on
with the other sites.
"""

from __future__ import annotations

import functools
import math
import operator
import time
from collections.abc import Callable, Iterable
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.model import ITEM_ROW_PARAMETERS
from common.protocol import (
    ARRAYS,
    CONFIG,
    DECLINED,
    ITEM_COUNTS,
    ITEM_GRAPH,
    METRICS,
    NUM_EXAMPLES,
    SITE_ID,
)
from server.item_graph import GraphRelease, RejectedStatistics
from server.round_book import RoundBook


class RejectedUpdate(ValueError):
    """A site update the server does not use; the message says why."""


class SitesMissing(RuntimeError):
    """Fewer sites connected than a round needs, after ``site-timeout``; the message names
    the missing ones."""


def sites_to_instruct(
    server_round: int,
    nodes: set[int],
    min_sites: int,
    min_sites_to_continue: int,
    site_timeout: float,
    book: RoundBook,
) -> int:
    """How many sites round ``server_round`` instructs once its wait for ``min_sites`` is
    over, with ``nodes`` connected: all of them if at least ``min_sites``, or (not in round
    0, which every site must join) at least ``min_sites_to_continue``, with a warning.
    Otherwise :class:`SitesMissing`, naming the sites seen before and missing now."""
    needed = min_sites if server_round == 0 else min_sites_to_continue
    if len(nodes) < min_sites:
        missing = [book.sender(n) for n in sorted(book.site_of_node) if n not in nodes]
        named = f" (missing: {', '.join(missing)})" if missing else ""
        waited = (
            f"round {server_round}: {len(nodes)} of min-sites = {min_sites} sites "
            f"connected after site-timeout = {site_timeout:g} s{named}"
        )
        if len(nodes) < needed:
            raise SitesMissing(f"{waited}; at least {needed} needed to go on")
        log(WARNING, "%s; going on with them (min-sites-to-continue = %d)", waited, needed)
    return len(nodes)


class ItemSideFedAvg(FedAvg):
    """FedAvg over the item side only, with update validation, logging into a round book.

    Args:
        template: the global item-side arrays; every update must match its keys,
            shapes and dtypes.
        dp: equal site weights when True, count weights when False.
        min_sites: sites a round waits for (every connected site is instructed).
        min_sites_to_continue: after round 0, the fewest sites a round goes on with once
            ``site_timeout`` has passed without ``min_sites`` connected (default: never
            fewer than ``min_sites``).
        site_timeout: seconds a round waits for ``min_sites`` to be connected; then it
            goes on, or the run stops with :class:`SitesMissing`.
        book: the run's round book.
        aggregation: ``"median"``, ``"trimmed-mean"`` or ``"mean"`` (module docstring).
        max_users_per_site: the public bound on a site's users; without DP a site's
            user count and each item's interaction count must not exceed it.
        evaluates_in: whether a round ends with a federated evaluation.
    """

    def __init__(
        self,
        template: ArrayRecord,
        dp: bool,
        min_sites: int,
        book: RoundBook,
        evaluates_in: Callable[[int], bool] = lambda server_round: True,
        release: GraphRelease | None = None,
        min_sites_to_continue: int | None = None,
        site_timeout: float = math.inf,
        aggregation: str = "mean",
        max_users_per_site: int | None = None,
    ) -> None:
        super().__init__(
            min_train_nodes=min_sites,
            min_evaluate_nodes=min_sites,
            min_available_nodes=min_sites,
        )
        self.min_sites = min_sites
        self.min_sites_to_continue = min_sites_to_continue or min_sites
        self.site_timeout = site_timeout
        self.global_arrays = template
        self.dp = dp
        self.book = book
        self.evaluates_in = evaluates_in
        self.release = release
        self.aggregation = aggregation
        self.max_users_per_site = max_users_per_site or math.inf
        self.outbox: list[Message] = []

    def received(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies, after noting which site each node is, failures, and silent nodes.

        An error reply may come from the SuperLink on a node's behalf (e.g. "node
        unavailable"); it is attributed to the node the instruction went to.
        """
        replies = list(replies)
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in self.outbox}
        origin = {
            id(r): node_of.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
            for r in replies
        }
        for reply in replies:
            if not reply.has_error():
                self.book.identify(origin[id(reply)], reply.content.metric_records.get(METRICS))
        for reply in replies:
            if reply.has_error():
                self.book.record_failure(server_round, origin[id(reply)], reply.error.reason)
        awaited = {m.metadata.dst_node_id for m in self.outbox}
        for node_id in awaited - set(origin.values()):
            self.book.record_failure(server_round, node_id, "no reply within round-timeout")
        if self.release is not None:
            succeeded = {origin[id(r)] for r in replies if not r.has_error()}
            for node_id in awaited:
                self.release.replied(node_id, node_id in succeeded)
        answered = [r for r in replies if not r.has_error()]
        self.book.check_completed(server_round, len(answered))
        return answered

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.book.stopped_after is not None:
            return self.sent([])
        self.global_arrays = arrays
        self.wait_for_sites(server_round, grid)
        return self.sent(
            self.with_graph(super().configure_train(server_round, arrays, config, grid))
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.book.stopped_after is not None or not self.evaluates_in(server_round):
            return self.sent([])  # nothing awaited: no site can be silent this round
        self.wait_for_sites(server_round, grid)
        return self.sent(
            self.with_graph(super().configure_evaluate(server_round, arrays, config, grid))
        )

    def wait_for_sites(self, server_round: int, grid: Grid) -> None:
        """Wait, at most ``site_timeout`` seconds, for ``min_sites`` connected sites; then
        every connected site is instructed: at least ``min_sites``, or after the timeout
        at least ``min_sites_to_continue`` (not in round 0, which every site must join).
        Otherwise raise :class:`SitesMissing`, naming the sites seen before and missing."""
        deadline = time.monotonic() + self.site_timeout
        while len(nodes := set(grid.get_node_ids())) < self.min_sites:
            if time.monotonic() >= deadline:
                break
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
        count = sites_to_instruct(
            server_round,
            nodes,
            self.min_sites,
            self.min_sites_to_continue,
            self.site_timeout,
            self.book,
        )
        self.min_available_nodes = self.min_train_nodes = self.min_evaluate_nodes = count

    def with_graph(self, messages: Iterable[Message]) -> Iterable[Message]:
        """Each instruction with what has been released of the item graph for its node
        (``GraphRelease.instruction``). Flower's FedAvg gives every message one shared
        content; here the instructions that carry the release's bytes share one and the
        others another, so Flower serialises and hashes each once."""
        if self.release is None:
            return messages
        messages = list(messages)
        contents: dict[bool, RecordDict] = {}
        for message in messages:
            graph = self.release.instruction(message.metadata.dst_node_id)
            carries = ITEM_GRAPH in graph
            if carries not in contents:
                records = dict(message.content.items())
                config = ConfigRecord(dict(records[CONFIG]) | graph)
                contents[carries] = RecordDict(records | {CONFIG: config})
            message.content = contents[carries]
        return messages

    def statistics_round(self, server_round: int) -> bool:
        return self.release is not None and self.release.config.is_statistics_round(server_round)

    def sent(self, messages: Iterable[Message]) -> list[Message]:
        """Remember the instructions of this round (the grid gives them ids when it sends)."""
        self.outbox = list(messages)
        return self.outbox

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted: list[tuple[dict[str, np.ndarray], MetricRecord]] = []
        for reply in self.received(server_round, replies):
            metrics = reply.content.metric_records.get(METRICS)
            try:
                arrays = self.read_update(reply, server_round)
            except (RejectedUpdate, RejectedStatistics) as rejection:
                self.book.record_rejection(server_round, reply.metadata.src_node_id, str(rejection))
                continue
            if self.book.record_training(server_round, metrics):
                continue
            accepted.append((arrays, metrics))
        if not accepted:
            self.book.stop_if_all_declined(server_round)
            return None, None
        if self.statistics_round(server_round):
            total = functools.reduce(operator.add, (a for a, _ in accepted))
            self.release.add(server_round, total, len(accepted))
            return None, None
        self.global_arrays = ArrayRecord({k: Array(v) for k, v in self.average(accepted).items()})
        if self.dp:  # the largest epsilon any site has spent
            return self.global_arrays, MetricRecord(
                {"max-epsilon": max(float(m["epsilon"]) for _, m in accepted)}
            )
        return self.global_arrays, None

    def read_update(self, reply: Message, server_round: int) -> dict[str, np.ndarray]:
        """The update's arrays (none for a decline; a round's statistics in a statistics
        round), checked; raises :class:`RejectedUpdate` or :class:`RejectedStatistics`
        with the reason."""
        content = reply.content
        metrics = content.metric_records.get(METRICS)
        if metrics is None or SITE_ID not in metrics:
            raise RejectedUpdate(f"expected a MetricRecord '{METRICS}' with '{SITE_ID}'")
        if metrics.get(DECLINED) == 1.0 and not content.array_records:
            return {}
        if set(content.array_records) != {ARRAYS}:
            raise RejectedUpdate(
                f"expected one ArrayRecord '{ARRAYS}', got {sorted(content.array_records)}"
            )
        received = content.array_records[ARRAYS]
        if self.statistics_round(server_round):
            sent = {k: v.numpy() for k, v in received.items()}
            return self.release.read(server_round, sent, int(metrics[SITE_ID]))
        expected = set(self.global_arrays) | (set() if self.dp else {ITEM_COUNTS})
        if set(received) != expected:
            missing, extra = sorted(expected - set(received)), sorted(set(received) - expected)
            raise RejectedUpdate(f"keys differ: missing {missing}, unexpected {extra}")
        arrays = {}
        for key, array in received.items():
            reference = self.global_arrays.get(key)
            if reference is not None and (
                tuple(array.shape) != tuple(reference.shape) or array.dtype != reference.dtype
            ):
                raise RejectedUpdate(
                    f"'{key}' has shape {tuple(array.shape)} and dtype {array.dtype}, "
                    f"expected {tuple(reference.shape)} and {reference.dtype}"
                )
            arrays[key] = array.numpy()
            if not np.all(np.isfinite(arrays[key])):
                raise RejectedUpdate(f"'{key}' holds NaN or infinite values")
        if not self.dp:
            self.check_counts(arrays[ITEM_COUNTS], float(metrics.get(NUM_EXAMPLES, 0)))
        return arrays

    def check_counts(self, counts: np.ndarray, users: float) -> None:
        """Without DP: a site's user count and per-item interaction counts, which weigh its
        rows in the mean, must be possible for ``max-users-per-site`` users."""
        num_items = self.global_arrays[ITEM_ROW_PARAMETERS[0]].shape[0]
        if counts.shape != (num_items,) or np.any(counts < 0):
            raise RejectedUpdate(
                f"'{ITEM_COUNTS}' must be {num_items} non-negative counts, got shape {counts.shape}"
            )
        if users <= 0:
            raise RejectedUpdate(f"dp = false needs a positive '{NUM_EXAMPLES}' metric")
        if users > self.max_users_per_site or np.any(counts > users):
            raise RejectedUpdate(
                f"claims {users:g} users and at most {counts.max():g} interactions with one "
                f"item: expected at most max-users-per-site = {self.max_users_per_site} "
                "users, each counted once per item"
            )

    def average(self, updates: list[tuple[dict[str, np.ndarray], MetricRecord]]) -> dict:
        """The new global arrays (formulas in the module docstring)."""
        current = {k: v.numpy() for k, v in self.global_arrays.items()}
        if self.aggregation in ("median", "trimmed-mean"):
            keys = list(current)
            sites = [([u[k] for k in keys], 1) for u, _ in updates]
            if self.aggregation == "median":
                robust = aggregate_median(sites)
            else:  # Flower cuts int(proportion * S) sites at each end: just over 1/S cuts one
                cut = 1.0001 / len(sites) if len(sites) >= 3 else 0.0
                robust = aggregate_trimmed_avg(sites, cut)
            return {k: m.astype(current[k].dtype) for k, m in zip(keys, robust, strict=True)}
        if self.dp:
            return {
                k: np.mean([u[k] for u, _ in updates], axis=0).astype(v.dtype)
                for k, v in current.items()
            }
        users = np.array([float(m[NUM_EXAMPLES]) for _, m in updates])
        counts = np.stack([u[ITEM_COUNTS] for u, _ in updates])  # [S, num_items]
        result = {}
        for key, value in current.items():
            stacked = np.stack([u[key] for u, _ in updates])
            if key in ITEM_ROW_PARAMETERS:
                total = counts.sum(0)
                weighted = np.einsum("si,si...->i...", counts, stacked)
                touched = (total > 0).reshape(-1, *([1] * (value.ndim - 1)))
                result[key] = np.where(
                    touched, weighted / np.maximum(total, 1).reshape(touched.shape), value
                ).astype(value.dtype)
            else:
                result[key] = np.tensordot(users / users.sum(), stacked, axes=1).astype(value.dtype)
        return result

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        metrics = [
            r.content.metric_records[METRICS]
            for r in self.received(server_round, replies)
            if METRICS in r.content.metric_records
        ]
        return self.book.record_evaluation(server_round, metrics, weighted=not self.dp)
