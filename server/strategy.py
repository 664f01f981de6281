r"""Item-side federated averaging, with every site update checked before use.

Sites send back the item-side parameters after local training. With DP on,
every site has the same weight (a count of users or interactions would be
private):

.. math::
    \theta \leftarrow \frac{1}{S} \sum_{s=1}^{S} \theta_s

With DP off, each item row is averaged with the sites' interaction counts for
that item (rows no site touched keep their global value) and every other
parameter with the sites' user counts:

.. math::
    e_i \leftarrow \frac{\sum_s c_{si}\, e_{si}}{\sum_s c_{si}}, \qquad
    W \leftarrow \frac{\sum_s n_s W_s}{\sum_s n_s}

An update with missing or unexpected keys, a wrong shape or dtype, or a NaN or
infinite value is rejected with a logged reason; the round goes on with the
other sites.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.model import ITEM_ROW_PARAMETERS
from common.privacy import ITEM_COUNTS


class RejectedUpdate(ValueError):
    """A site update the server does not use; the message says why."""


@dataclass
class RoundLog:
    """What happened in one round, per site (keyed by ``site-id``)."""

    train: dict[int, dict[str, float]] = field(default_factory=dict)
    declined: dict[int, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[int, dict[str, float]] = field(default_factory=dict)
    aggregated: dict[str, float] = field(default_factory=dict)
    finished_at: float | None = None
    discarded: bool = False
    rejected: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


class ItemSideFedAvg(FedAvg):
    """FedAvg over the item side only, with update validation and a per-round log.

    Args:
        template: the global item-side arrays; every update must match its keys,
            shapes and dtypes.
        dp: equal site weights when True, count weights when False.
        min_sites: sites to wait for and sample every round.
        evaluates_in: whether a round ends with a federated evaluation.
    """

    def __init__(
        self, template: ArrayRecord, dp: bool, min_sites: int, evaluates_in=lambda r: True
    ) -> None:
        super().__init__(
            min_train_nodes=min_sites,
            min_evaluate_nodes=min_sites,
            min_available_nodes=min_sites,
        )
        self.global_arrays = template
        self.dp = dp
        self.evaluates_in = evaluates_in
        self.log: dict[int, RoundLog] = {}
        self.stopped_after: int | None = None
        self.site_of_node: dict[int, int] = {}
        self.outbox: list[Message] = []

    def round_log(self, server_round: int) -> RoundLog:
        return self.log.setdefault(server_round, RoundLog())

    def sender(self, node_id: int) -> str:
        """``site <k>`` once the node has said which site it is, else ``node <id>``."""
        site = self.site_of_node.get(node_id)
        return f"node {node_id}" if site is None else f"site {site}"

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
            metrics = None if reply.has_error() else reply.content.metric_records.get("metrics")
            if metrics is not None and "site-id" in metrics:
                self.site_of_node[origin[id(reply)]] = int(metrics["site-id"])
        for reply in replies:
            if reply.has_error():
                self.record_failure(server_round, origin[id(reply)], reply.error.reason)
        awaited = {m.metadata.dst_node_id for m in self.outbox}
        for node_id in awaited - set(origin.values()):
            self.record_failure(server_round, node_id, "no reply within round-timeout")
        return [r for r in replies if not r.has_error()]

    def record_failure(self, server_round: int, node_id: int, reason: str) -> None:
        """Log a failed site in full; keep its last line in the round log."""
        sender = self.sender(node_id)
        log(WARNING, "Round %d: %s failed: %s", server_round, sender, reason)
        self.round_log(server_round).failed[sender] = last_line(reason)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.stopped_after is not None:
            return self.sent([])
        self.global_arrays = arrays
        return self.sent(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.stopped_after is not None or not self.evaluates_in(server_round):
            return self.sent([])  # nothing awaited: no site can be silent this round
        return self.sent(super().configure_evaluate(server_round, arrays, config, grid))

    def sent(self, messages: Iterable[Message]) -> list[Message]:
        """Remember the instructions of this round (the grid gives them ids when it sends)."""
        self.outbox = list(messages)
        return self.outbox

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        record = self.round_log(server_round)
        accepted: list[tuple[dict[str, np.ndarray], MetricRecord]] = []
        for reply in self.received(server_round, replies):
            sender = self.sender(reply.metadata.src_node_id)
            metrics = reply.content.metric_records.get("metrics")
            if metrics is not None and metrics.get("declined") == 1.0 and "site-id" in metrics:
                record.declined[int(metrics["site-id"])] = dict(metrics)
                log(WARNING, "Round %d: %s declined: max-epsilon reached", server_round, sender)
                continue
            try:
                arrays = self.read_update(reply)
            except RejectedUpdate as rejection:
                record.rejected[sender] = str(rejection)
                log(
                    WARNING,
                    "Round %d: rejected the update of %s: %s",
                    server_round,
                    sender,
                    rejection,
                )
                continue
            record.train[int(metrics["site-id"])] = dict(metrics)
            accepted.append((arrays, metrics))
        if not accepted:
            if record.declined and not record.rejected and not record.failed:
                self.stopped_after = server_round
                log(
                    WARNING,
                    "Round %d: no site can train within max-epsilon; stopping",
                    server_round,
                )
            return None, None
        self.global_arrays = ArrayRecord({k: Array(v) for k, v in self.average(accepted).items()})
        if self.dp:  # the largest epsilon any site has spent
            return self.global_arrays, MetricRecord(
                {"max-epsilon": max(float(m["epsilon"]) for _, m in accepted)}
            )
        return self.global_arrays, mean_metrics(
            [m for _, m in accepted], weighted=True, skip=("site-id",)
        )

    def read_update(self, reply: Message) -> dict[str, np.ndarray]:
        """The update's arrays, checked; raises :class:`RejectedUpdate` with the reason."""
        content = reply.content
        metrics = content.metric_records.get("metrics")
        if set(content.array_records) != {"arrays"} or metrics is None:
            raise RejectedUpdate(
                "expected one ArrayRecord 'arrays' and one MetricRecord 'metrics', got "
                f"{sorted(content.array_records)} and {sorted(content.metric_records)}"
            )
        if "site-id" not in metrics:
            raise RejectedUpdate("the MetricRecord has no 'site-id'")
        received = content.array_records["arrays"]
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
            num_items = self.global_arrays[ITEM_ROW_PARAMETERS[0]].shape[0]
            counts = arrays[ITEM_COUNTS]
            if counts.shape != (num_items,) or np.any(counts < 0):
                raise RejectedUpdate(
                    f"'{ITEM_COUNTS}' must be {num_items} non-negative counts, "
                    f"got shape {counts.shape}"
                )
            if float(metrics.get("num-examples", 0)) <= 0:
                raise RejectedUpdate("dp = false needs a positive 'num-examples' metric")
        return arrays

    def average(self, updates: list[tuple[dict[str, np.ndarray], MetricRecord]]) -> dict:
        """The new global arrays (formulas in the module docstring)."""
        current = {k: v.numpy() for k, v in self.global_arrays.items()}
        if self.dp:
            return {
                k: np.mean([u[k] for u, _ in updates], axis=0).astype(v.dtype)
                for k, v in current.items()
            }
        users = np.array([float(m["num-examples"]) for _, m in updates])
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
        record = self.round_log(server_round)
        collected = []
        for reply in self.received(server_round, replies):
            metrics = reply.content.metric_records.get("metrics")
            if metrics is None or "site-id" not in metrics:
                continue
            record.evaluate[int(metrics["site-id"])] = dict(metrics)
            collected.append(metrics)
        if not collected:
            return None
        aggregated = mean_metrics(collected, weighted=not self.dp, skip=("site-id",))
        record.aggregated = dict(aggregated)
        return aggregated


def last_line(reason: str) -> str:
    """The line of an error report that says what went wrong (its last), shortened."""
    lines = [line.strip() for line in reason.replace("\\n", "\n").splitlines() if line.strip()]
    return (lines[-1] if lines else "no reason given")[:300]


def mean_metrics(
    records: list[MetricRecord], weighted: bool, skip: tuple[str, ...] = ()
) -> MetricRecord:
    """Mean of every metric over sites; weighted by ``num-examples`` when ``weighted``."""
    weights = np.array([float(r["num-examples"]) if weighted else 1.0 for r in records])
    keys = sorted(set().union(*records) - set(skip) - {"num-examples"})
    out = {}
    for key in keys:
        have = [(w, float(r[key])) for w, r in zip(weights, records, strict=True) if key in r]
        total = sum(w for w, _ in have)
        out[key] = sum(w * v for w, v in have) / total
    return MetricRecord(out)
