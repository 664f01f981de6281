"""The messages between the server and a site: every key they carry, in one place.

**Instruction** (server to site), a ConfigRecord ``config``: every key of the
run configuration (``common.config``) plus :data:`INSTRUCTION_KEYS`. Train and
evaluate instructions also carry the global item side as the ArrayRecord
``arrays`` (the Message API) or as the legacy API's parameters (secure
aggregation).

**Reply** (site to server): a MetricRecord ``metrics`` with :data:`SITE_ID`,
the round's ledger values (``common.privacy.LEDGER_METRICS``) or evaluation
metrics, and, for training on the Message API, the ArrayRecord ``arrays``.
Which key a reply may hold, and whether the DP guarantee covers it, is the
release inventory (``common.privacy.released_quantities``): a site refuses to
send anything else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.config import RunConfig

CONFIG = "config"
ARRAYS = "arrays"
METRICS = "metrics"
"""Record names of instructions and replies."""

SERVER_ROUND = "server-round"
RUN_NAME = "run-name"
CATALOGUE_FINGERPRINT = "catalogue-fingerprint"
"""The run's catalogue, which every site checks against its own."""
INSTRUCTION_KEYS = (SERVER_ROUND, RUN_NAME, CATALOGUE_FINGERPRINT)
"""What the server adds to the run configuration in every instruction."""

ITEM_GRAPH_FINGERPRINT = "item-graph-fingerprint"
"""The SHA-256 of what the server has released of the item graph so far
(``common.graph.release.ItemGraph.fingerprint``); in every instruction from round 2 of
a run with an item graph."""
ITEM_GRAPH = "item-graph-release"
"""That release as bytes, in a node's instruction until the node has replied to one
that carried it (``server.item_graph.GraphRelease.instruction``); the site keeps it
in its state folder (``client.site_state.SiteState.item_graph``)."""

SITE_ID = "site-id"
DECLINED = "declined"
"""1.0 when the site did not train this round (``max-epsilon``), else 0.0."""
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
ITEM_COUNTS = "item-counts"
"""Per-item training interaction counts (``dp = false`` only), in ``arrays``."""
STATISTICS = "item-graph-statistics"
"""A site's item-graph statistics of the round (a vector, or a sparse Gram's values)."""
STATISTICS_ROWS, STATISTICS_COLUMNS = "item-graph-statistics-rows", "item-graph-statistics-columns"
"""The row and column of each value of a sparse Gram (large catalogue, ``dp = false``)."""

ITEM_SIDE = "<item-side parameters>"
"""Stands for every shared parameter of the model in the release inventory."""
SECURE_SUM_SHARE = "<masked integer share of the secure sum>"
"""Stands for a site's vector inside SecAgg+ in the release inventory."""


def instruction_values(
    config: RunConfig, run_name: str, catalogue_fingerprint: str, server_round: int | None = None
) -> dict[str, Any]:
    """An instruction's content: the run configuration and :data:`INSTRUCTION_KEYS`. The
    server leaves out ``server_round``, which Flower's strategy adds per round; a site
    round opened outside Flower (benchmarks, tests) passes it."""
    values = config.to_mapping() | {
        RUN_NAME: run_name,
        CATALOGUE_FINGERPRINT: catalogue_fingerprint,
    }
    return values if server_round is None else values | {SERVER_ROUND: server_round}
