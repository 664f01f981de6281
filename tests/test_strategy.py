"""Aggregation maths and update validation of the item-side strategy."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)

from common.protocol import ITEM_COUNTS
from server.round_book import NoSiteCompleted, RoundBook, mean_metrics
from server.strategy import ItemSideFedAvg, SitesMissing

NUM_ITEMS, DIM = 4, 2


def global_arrays() -> ArrayRecord:
    return as_record(
        {
            "item_embedding.weight": np.zeros((NUM_ITEMS, DIM), np.float32),
            "item_bias.weight": np.zeros((NUM_ITEMS, 1), np.float32),
            "dense.weight": np.zeros((DIM, DIM), np.float32),
        }
    )


def as_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def metadata_from(
    node_id: int, dst_node_id: int = 0, message_id: str = "", reply_to: str = "i"
) -> Metadata:
    return Metadata(
        run_id=1,
        message_id=message_id or f"m{node_id}",
        src_node_id=node_id,
        dst_node_id=dst_node_id,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )


def reply_from(node_id: int, arrays: dict[str, np.ndarray], metrics: dict) -> Message:
    """A reply as the server receives it from ``node_id`` (to its instruction, if any)."""
    content = RecordDict({"arrays": as_record(arrays), "metrics": MetricRecord(metrics)})
    return Message(content, metadata=metadata_from(node_id, reply_to=f"to-{node_id}"))


def site_update(value: float, counts: list[float] | None = None) -> dict[str, np.ndarray]:
    arrays = {k: np.full(v.shape, value, np.float32) for k, v in global_arrays().items()}
    if counts is not None:
        arrays[ITEM_COUNTS] = np.array(counts, np.float32)
    return arrays


def test_dp_averages_every_array_with_equal_weights():
    strategy = ItemSideFedAvg(global_arrays(), dp=True, min_sites=2, book=RoundBook())
    replies = [
        reply_from(1, site_update(1.0), {"site-id": 0, "epsilon": 1.0}),
        reply_from(2, site_update(4.0), {"site-id": 1, "epsilon": 1.0}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    for value in arrays.values():
        np.testing.assert_allclose(value.numpy(), 2.5)
        assert value.dtype == "float32"


def test_without_dp_item_rows_are_count_weighted_and_untouched_rows_kept():
    template = global_arrays()
    template["item_embedding.weight"] = Array(np.full((NUM_ITEMS, DIM), 7.0, np.float32))
    strategy = ItemSideFedAvg(template, dp=False, min_sites=2, book=RoundBook())
    replies = [
        reply_from(1, site_update(1.0, [3, 0, 1, 0]), {"site-id": 0, "num-examples": 10}),
        reply_from(2, site_update(5.0, [1, 2, 0, 0]), {"site-id": 1, "num-examples": 30}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    rows = arrays["item_embedding.weight"].numpy()[:, 0]
    np.testing.assert_allclose(rows, [(3 * 1 + 1 * 5) / 4, 5.0, 1.0, 7.0])
    np.testing.assert_allclose(arrays["dense.weight"].numpy(), (10 * 1 + 30 * 5) / 40)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"item_bias.weight": np.zeros((NUM_ITEMS + 1, 1), np.float32)}, "shape"),
        ({"item_bias.weight": np.zeros((NUM_ITEMS, 1), np.float64)}, "dtype"),
        ({"dense.weight": np.full((DIM, DIM), np.nan, np.float32)}, "NaN"),
        ({"dense.weight": np.full((DIM, DIM), np.inf, np.float32)}, "infinite"),
        ({"user_embedding.weight": np.zeros((3, DIM), np.float32)}, "unexpected"),
    ],
)
def test_malformed_update_is_rejected_and_round_goes_on(bad, reason):
    strategy = ItemSideFedAvg(global_arrays(), dp=True, min_sites=2, book=RoundBook())
    broken = site_update(100.0) | bad
    replies = [
        reply_from(1, site_update(2.0), {"site-id": 0, "epsilon": 1.0}),
        reply_from(2, broken, {"site-id": 1, "epsilon": 1.0}),
    ]
    arrays, _ = strategy.aggregate_train(3, replies)
    np.testing.assert_allclose(arrays["dense.weight"].numpy(), 2.0)
    assert list(strategy.book.rounds[3].rejected) == ["site 1"]
    assert reason in strategy.book.rounds[3].rejected["site 1"]
    assert list(strategy.book.rounds[3].train) == [0]


def test_a_failed_site_is_logged_by_its_last_line_and_the_round_goes_on():
    strategy = ItemSideFedAvg(global_arrays(), dp=True, min_sites=2, book=RoundBook())
    failure = Message(
        Error(code=0, reason="Traceback ...\n  File x\nValueError: bad data\n"),
        metadata=metadata_from(7),
    )
    arrays, _ = strategy.aggregate_train(
        2, [failure, reply_from(1, site_update(3.0), {"site-id": 0, "epsilon": 1.0})]
    )
    np.testing.assert_allclose(arrays["dense.weight"].numpy(), 3.0)
    assert strategy.book.rounds[2].failed == {"node 7": "ValueError: bad data"}


def test_when_every_site_fails_the_reason_names_sites_by_id_with_one_short_reason_each():
    """Ten sites, before any said which site it is: the ClientApp's errors start with the
    site id (``client.app.name_failures``); equal reasons are said once, long ones cut."""
    book = RoundBook()
    for node in range(10):
        reason = "the site's disk is full" if node < 8 else "x" * 2000
        trace = f"Traceback ...\nclient.app.SiteFailed: site {9 - node}: {reason}\n"
        book.record_failure(0, 1000 + node, trace)
    with pytest.raises(NoSiteCompleted) as failed:
        book.check_completed(0, answered=0)
    reason = str(failed.value)
    assert reason.startswith("no site completed round 0 (site 0, site 1: xxx"), reason
    assert reason.endswith(
        "...; site 2, site 3, site 4, site 5, site 6, site 7, site 8, site 9: the site's "
        "disk is full)"
    )
    assert len(reason) < 300 and "node" not in reason


def instruction_to(node_id: int) -> Message:
    """An instruction to ``node_id`` as the grid leaves it after sending (with an id)."""
    return Message(RecordDict(), metadata=metadata_from(0, node_id, f"to-{node_id}", ""))


def test_silent_and_unavailable_sites_are_named_by_the_site_they_said_they_were():
    strategy = ItemSideFedAvg(global_arrays(), dp=True, min_sites=2, book=RoundBook())
    nodes = (1, 2, 3)
    strategy.sent([instruction_to(n) for n in nodes])
    strategy.aggregate_train(
        1,
        [reply_from(n, site_update(1.0), {"site-id": n + 10, "epsilon": 1.0}) for n in nodes],
    )
    strategy.sent([instruction_to(n) for n in nodes])
    unavailable = Message(  # made by the SuperLink: its own node id, a reply to node 3's message
        Error(code=0, reason="Node Unavailable"),
        metadata=metadata_from(1, reply_to="to-3"),
    )
    strategy.aggregate_train(
        2, [reply_from(1, site_update(1.0), {"site-id": 11, "epsilon": 1.0}), unavailable]
    )
    assert strategy.book.rounds[2].failed == {
        "site 12": "no reply within round-timeout",
        "site 13": "Node Unavailable",
    }


def test_a_round_without_evaluation_awaits_no_site():
    strategy = ItemSideFedAvg(
        global_arrays(), dp=True, min_sites=2, book=RoundBook(), evaluates_in=lambda r: r % 2 == 0
    )
    strategy.sent([instruction_to(n) for n in (1, 2)])
    strategy.aggregate_train(
        1, [reply_from(n, site_update(1.0), {"site-id": n, "epsilon": 1.0}) for n in (1, 2)]
    )
    assert strategy.configure_evaluate(1, global_arrays(), None, None) == []
    strategy.aggregate_evaluate(1, [])
    assert strategy.book.rounds[1].failed == {}


def test_missing_key_is_rejected():
    strategy = ItemSideFedAvg(global_arrays(), dp=True, min_sites=1, book=RoundBook())
    partial = site_update(1.0)
    del partial["dense.weight"]
    arrays, _ = strategy.aggregate_train(1, [reply_from(1, partial, {"site-id": 0})])
    assert arrays is None
    assert "missing ['dense.weight']" in strategy.book.rounds[1].rejected["site 0"]


def test_mean_metrics_weighting():
    records = [
        MetricRecord({"site-id": 0, "val-rmse": 1.0, "num-examples": 1}),
        MetricRecord({"site-id": 1, "val-rmse": 2.0, "num-examples": 3}),
    ]
    assert mean_metrics(records, weighted=False, skip=("site-id",))["val-rmse"] == 1.5
    assert mean_metrics(records, weighted=True, skip=("site-id",))["val-rmse"] == 1.75


class Connected:
    """A grid that reports ``nodes`` connected."""

    def __init__(self, *nodes: int) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def strategy_with_three_sites(**changes) -> ItemSideFedAvg:
    """A strategy for 3 sites whose round 0 identified nodes 1, 2, 3 as sites 0, 1, 2."""
    book = RoundBook()
    for node in (1, 2, 3):
        book.identify(node, {"site-id": node - 1})
    return ItemSideFedAvg(
        global_arrays(), dp=True, min_sites=3, book=book, site_timeout=0.2, **changes
    )


def test_a_dead_site_stops_the_run_after_site_timeout_naming_it():
    strategy = strategy_with_three_sites()
    start = time.monotonic()
    with pytest.raises(SitesMissing) as error:
        strategy.configure_train(2, global_arrays(), ConfigRecord(), Connected(1, 3))
    assert 0.2 <= time.monotonic() - start < 2.0
    assert str(error.value) == (
        "round 2: 2 of min-sites = 3 sites connected after site-timeout = 0.2 s "
        "(missing: site 1); at least 3 needed to go on"
    )


def test_a_round_goes_on_with_min_sites_to_continue_but_round_0_needs_every_site():
    strategy = strategy_with_three_sites(min_sites_to_continue=2)
    sent = strategy.wait_for_sites(2, Connected(1, 3))
    assert sent is None and strategy.min_available_nodes == strategy.min_train_nodes == 2
    with pytest.raises(SitesMissing, match="round 0: 2 of min-sites = 3"):
        strategy.wait_for_sites(0, Connected(1, 3))
