"""The round book: what happened in every round at every site, kept by either strategy.

Both ways of running rounds (item-side averaging on the Message API,
``server.strategy``; the secure sum on the legacy API,
``server.secure_aggregation``) write into one :class:`RoundBook`: which site
each node said it was, each site's training and evaluation metrics, declines,
rejected updates, failures, the aggregated evaluation metrics, and the round
after which no site could train. The run directory is written from it
(``server.run_directory``).

A round in which sites were asked and none completed its part stops the run
(:class:`NoSiteCompleted`): every later round would fail the same way.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import MetricRecord
from flwr.common import log

from common.metric_release import is_sum, metrics_from_sums
from common.privacy import LEDGER_METRICS
from common.protocol import DECLINED, NUM_EXAMPLES, SITE_ID


class NoSiteCompleted(RuntimeError):
    """No site completed a round; the message names the round and each site's reason."""


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


class RoundBook:
    """Every round's :class:`RoundLog`, which node is which site, and when training stopped."""

    def __init__(self) -> None:
        self.rounds: dict[int, RoundLog] = {}
        self.site_of_node: dict[int, int] = {}
        self.stopped_after: int | None = None
        self.stopped_early: str | None = None

    def round(self, server_round: int) -> RoundLog:
        return self.rounds.setdefault(server_round, RoundLog())

    def sender(self, node_id: int) -> str:
        """``site <k>`` once the node has said which site it is, else ``node <id>``."""
        site = self.site_of_node.get(node_id)
        return f"node {node_id}" if site is None else f"site {site}"

    def identify(self, node_id: int, metrics: Mapping[str, object] | None) -> None:
        """Note which site ``node_id`` is, if its reply's metrics say so."""
        if metrics is not None and SITE_ID in metrics:
            self.site_of_node[node_id] = int(metrics[SITE_ID])

    def record_failure(self, server_round: int, node_id: int, reason: str) -> None:
        """Log a failed site by the last line of its error, which says what went wrong
        (and, from ``client.app.name_failures``, which site it is)."""
        line = last_line(reason)
        named = NAMED_SITE.search(line)
        if named is not None:
            self.site_of_node.setdefault(node_id, int(named[1]))
            line = named[2]
        sender = self.sender(node_id)
        log(WARNING, "Round %d: %s failed: %s", server_round, sender, line)
        self.round(server_round).failed[sender] = line

    def check_completed(self, server_round: int, answered: int) -> None:
        """Raise :class:`NoSiteCompleted` when sites failed and ``answered`` (the replies
        without error) is zero."""
        failed = self.round(server_round).failed
        if failed and answered == 0:
            senders: dict[str, list[str]] = {}
            for sender, reason in sorted(failed.items(), key=lambda item: sender_order(item[0])):
                senders.setdefault(reason, []).append(sender)
            reasons = "; ".join(f"{', '.join(s)}: {reason}" for reason, s in senders.items())
            raise NoSiteCompleted(f"no site completed round {server_round} ({reasons})")

    def record_training(self, server_round: int, metrics: Mapping[str, object]) -> bool:
        """Log a site's training metrics; returns whether the site declined to train."""
        site, values = int(metrics[SITE_ID]), dict(metrics)
        if metrics.get(DECLINED) == 1.0:
            self.round(server_round).declined[site] = values
            log(WARNING, "Round %d: site %d declined: max-epsilon reached", server_round, site)
            return True
        self.round(server_round).train[site] = values
        return False

    def record_rejection(self, server_round: int, node_id: int, reason: str) -> None:
        sender = self.sender(node_id)
        log(WARNING, "Round %d: rejected the update of %s: %s", server_round, sender, reason)
        self.round(server_round).rejected[sender] = reason

    def record_evaluation(
        self, server_round: int, replies: Iterable[Mapping[str, object]], weighted: bool
    ) -> MetricRecord | None:
        """Log each site's evaluation reply and the federation's metrics: from the sites'
        noisy sums (``evaluation = "dp"``, ``common.metric_release``), or the mean of
        their exact metrics (weighted by ``num-examples`` when ``weighted``). Returns
        them, or None when no site replied."""
        record = self.round(server_round)
        collected = [MetricRecord(dict(m)) for m in replies if SITE_ID in m]
        for metrics in collected:
            record.evaluate[int(metrics[SITE_ID])] = dict(metrics)
            if metrics.get(DECLINED) == 1.0:
                log(
                    WARNING,
                    "Round %d: site %d declined to evaluate: max-epsilon reached",
                    server_round,
                    int(metrics[SITE_ID]),
                )
        if not collected:
            return None
        not_metrics = {SITE_ID, DECLINED, *LEDGER_METRICS}
        not_metrics |= {key for metrics in collected for key in metrics if is_sum(key)}
        aggregated = mean_metrics(collected, weighted=weighted, skip=tuple(not_metrics))
        aggregated = MetricRecord(dict(aggregated) | metrics_from_sums(collected))
        record.aggregated = dict(aggregated)
        return aggregated

    def stop_if_all_declined(self, server_round: int) -> None:
        """Stop training after ``server_round`` if every site that answered declined."""
        record = self.round(server_round)
        if record.declined and not (record.train or record.rejected or record.failed):
            self.stopped_after = server_round
            log(WARNING, "Round %d: no site can train within max-epsilon; stopping", server_round)

    def stop_early(self, server_round: int, reason: str) -> None:
        """Stop training after ``server_round`` for ``reason`` (the validation metric)."""
        self.stopped_after = server_round
        self.stopped_early = reason
        log(INFO, "Round %d: %s; training stops here", server_round, reason)

    def finish(self, server_round: int) -> None:
        self.round(server_round).finished_at = time.time()


SIMULATION_WRAPPER = "Exception ClientAppException occurred. Message: "
"""How Flower's simulation wraps a ClientApp's error message (it also ends it with ``'>``)."""


NAMED_SITE = re.compile(r"(?:^|: )site (\d+): (.*)$")
"""A failure ``client.app.name_failures`` named: the site's id and its reason."""
SHORT_REASON = 160
"""Characters kept of a failed site's reason (its whole error is in the site's log)."""


def sender_order(sender: str) -> tuple[int, int]:
    """Sites by id, then unnamed nodes."""
    kind, number = sender.split(" ", 1)
    return (0 if kind == "site" else 1, int(number))


def last_line(reason: str) -> str:
    """The line of an error report that says what went wrong (its last), without the
    wrapping Flower's simulation adds, shortened."""
    lines = [line.strip() for line in reason.replace("\\n", "\n").splitlines() if line.strip()]
    line = lines[-1] if lines else "no reason given"
    if SIMULATION_WRAPPER in line:
        line = line.split(SIMULATION_WRAPPER, 1)[1].removesuffix("'>")
    return line if len(line) <= SHORT_REASON else line[: SHORT_REASON - 3] + "..."


def mean_metrics(
    records: list[MetricRecord], weighted: bool, skip: tuple[str, ...] = ()
) -> MetricRecord:
    """Mean of every metric over the sites that report it; weighted by ``num-examples``
    when ``weighted`` (a reply with no metric, such as round 0's check-in, has none)."""
    keys = sorted(set().union(*records) - set(skip) - {NUM_EXAMPLES})
    out = {}
    for key in keys:
        have = [
            (float(r[NUM_EXAMPLES]) if weighted else 1.0, float(r[key]))
            for r in records
            if key in r
        ]
        total = sum(w for w, _ in have)
        out[key] = sum(w * v for w, v in have) / total
    return MetricRecord(out)
