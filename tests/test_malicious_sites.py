"""Issue 28: a site's item-graph statistics are checked before the server adds them in; a
site that sends NaN, a wrong shape, an oversized norm, an impossible Gram or negative exact
degrees is rejected with a clear reason, and the round goes on with the others; the trained
item side is aggregated by a coordinate-wise trimmed mean (or median), and counts beyond
max-users-per-site are rejected."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from flower_helpers import simulate
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from test_strategy import global_arrays, metadata_from, reply_from, site_update

from client.app import make_app
from client.secure_aggregation import secure_aggregation_mod
from common.config import default_config
from common.data import load_site
from common.errors import InputError
from common.graph.release import contribution
from common.model import item_side_size
from common.privacy import site_mechanism
from common.protocol import ARRAYS, STATISTICS, STATISTICS_COLUMNS, STATISTICS_ROWS
from server.item_graph import GraphRelease, RejectedStatistics
from server.round_book import RoundBook
from server.run_directory import RunDirectory
from server.strategy import ItemSideFedAvg

SITES = 2


def release_for(tmp_path, **changes) -> tuple[GraphRelease, list]:
    """The server's release of a two-site synthetic federation, and each site's data."""
    config = default_config(
        item_graph="filter",
        synthetic_users=160,
        max_users_per_site=100,
        run_dir=str(tmp_path),
        **changes,
    )
    sites = [load_site(config, k, SITES) for k in range(SITES)]
    catalogue = sites[0].catalogue
    mechanism = site_mechanism(config, item_side_size(catalogue, config))
    out = RunDirectory.create(config, "synthetic")
    return GraphRelease(config, catalogue, mechanism, out), sites


def statistics_reply(node: int, site_id: int, arrays: dict[str, np.ndarray]) -> Message:
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    content = RecordDict({"arrays": record, "metrics": MetricRecord({"site-id": site_id})})
    return Message(content, metadata=metadata_from(node, reply_to=f"to-{node}"))


def round_with(release: GraphRelease, server_round: int, honest, sent) -> ItemSideFedAvg:
    """Round ``server_round`` with site 0 honest and site 1 sending ``sent``."""
    strategy = ItemSideFedAvg(
        ArrayRecord(), dp=release.config.dp, min_sites=SITES, book=RoundBook(), release=release
    )
    replies = [statistics_reply(1, 0, honest), statistics_reply(2, 1, sent)]
    strategy.aggregate_train(server_round, replies)
    return strategy


def vector(total) -> dict[str, np.ndarray]:
    return {STATISTICS: np.asarray(total, np.float64)}


def tampered_round_1():
    """Ranking degrees (round 1) tampered with in each way the server must catch."""

    def nan(v):
        v = v.copy()
        v[3] = np.nan
        return v

    def negative(v):
        v = v.copy()
        v[0] = -1.0
        return v

    return [
        (nan, {}, "NaN or infinite"),
        (lambda v: v[:-1], {}, "expected 400 statistics"),
        (lambda v: v * 1e6, {}, "exceeds"),  # a scaled contribution
        (lambda v: v * 1e6, {"dp": True, "target_epsilon": 8.0}, "exceeds"),
        (negative, {}, "non-negative"),
    ]


@pytest.mark.parametrize(("tamper", "changes", "reason"), tampered_round_1())
def test_round_1_statistics_that_no_honest_site_can_send_are_rejected(
    tmp_path, tamper, changes, reason
):
    release, sites = release_for(tmp_path, **({"task": "ranking", "dp": False} | changes))
    config = release.config
    honest = [contribution(config, site, 1, release.graph) for site in sites]
    strategy = round_with(release, 1, vector(honest[0]), vector(tamper(honest[1])))
    record = strategy.book.rounds[1]
    assert list(record.rejected) == ["site 1"] and reason in record.rejected["site 1"]
    assert list(record.train) == [0]  # the round went on with site 0
    if not config.dp:
        np.testing.assert_allclose(release.graph.degrees, honest[0])


@pytest.mark.parametrize("task", ["ranking", "rating"])
@pytest.mark.parametrize("dp", [False, True])
def test_an_honest_site_passes_every_check_under_dp_and_without(tmp_path, task, dp):
    release, sites = release_for(tmp_path, task=task, dp=dp, target_epsilon=8.0)
    for server_round in (1, 2):
        totals = [contribution(release.config, s, server_round, release.graph) for s in sites]
        strategy = round_with(release, server_round, vector(totals[0]), vector(totals[1]))
        assert strategy.book.rounds[server_round].rejected == {}


def test_a_gram_that_is_no_sum_of_outer_products_is_rejected(tmp_path):
    """Round 2 without DP: an entry beyond Cauchy-Schwarz (|G_ij| > sqrt(G_ii G_jj)), a
    negative diagonal, a Gram scaled up past max-users-per-site users' trace (the site
    has 80 users: 1.5 times its Gram looks like 120 users, within the norm bound), or a
    diagonal beyond the site's own round-1 degrees, in the dense isometry; an asymmetric
    sparse Gram."""
    release, sites = release_for(tmp_path, task="ranking", dp=False)
    config = release.config
    first = [contribution(config, site, 1, release.graph) for site in sites]
    round_with(release, 1, vector(first[0]), vector(first[1]))
    honest = [contribution(config, site, 2, release.graph) for site in sites]
    m = len(release.graph.items)
    inflated = honest[1].copy()
    inflated[m] = 10 * np.sqrt(2.0) * np.sqrt(inflated[0] * inflated[1]) + 1.0  # G_01
    negative = honest[1].copy()
    negative[2] = -1.0
    for sent, reason in (
        (inflated, "larger than its diagonal"),
        (negative, "negative"),
        (honest[1] * 1.5, "trace"),
    ):
        strategy = round_with(release, 2, vector(honest[0]), vector(sent))
        assert reason in strategy.book.rounds[2].rejected["site 1"]

    # degrees sent low in round 1 (each within its checks), then an honest Gram
    round_with(release, 1, vector(first[0]), vector(first[1] * 0.01))
    strategy = round_with(release, 2, vector(honest[0]), vector(honest[1]))
    assert "round-1 degrees" in strategy.book.rounds[2].rejected["site 1"]

    release, _ = release_for(
        tmp_path / "sparse", task="ranking", dp=False, item_graph_dense_items=10
    )
    first = [contribution(release.config, site, 1, release.graph) for site in sites]
    round_with(release, 1, vector(first[0]), vector(first[1]))
    gram = contribution(release.config, sites[1], 2, release.graph).tocoo()
    upper = gram.row < gram.col
    values = np.where(upper, gram.data * 0.5, gram.data)  # the upper triangle halved
    asymmetric = {STATISTICS_ROWS: gram.row, STATISTICS_COLUMNS: gram.col, STATISTICS: values}
    honest_gram = contribution(release.config, sites[0], 2, release.graph).tocoo()
    honest_arrays = {
        STATISTICS_ROWS: honest_gram.row,
        STATISTICS_COLUMNS: honest_gram.col,
        STATISTICS: honest_gram.data,
    }
    strategy = round_with(release, 2, honest_arrays, asymmetric)
    assert "not symmetric" in strategy.book.rounds[2].rejected["site 1"]
    assert sp.issparse(contribution(release.config, sites[0], 2, release.graph))


def test_under_secure_aggregation_only_the_sums_range_and_consistency_are_checked(tmp_path):
    """The server sees the sum of the sites alone: an honest sum passes, a sum scaled past
    what the sites' users can give is refused (no site can be named)."""
    release, sites = release_for(
        tmp_path, task="ranking", target_epsilon=8.0, secure_aggregation=True
    )
    total = sum(contribution(release.config, site, 1, release.graph) for site in sites)
    release.check_secure_sum(1, total, SITES)
    with pytest.raises(RejectedStatistics, match=r"secure sum's norm .* exceeds"):
        release.check_secure_sum(1, total * 1e6, SITES)


# -- the trained item side ---------------------------------------------------------


def item_side_round(aggregation: str, sent: dict[str, np.ndarray], users: float = 10):
    """Round 3 of four honest sites (values 1..4, 10 users each, every item touched) and
    site 9 sending ``sent`` and claiming ``users`` users; max-users-per-site = 100."""
    strategy = ItemSideFedAvg(
        global_arrays(),
        dp=False,
        min_sites=5,
        book=RoundBook(),
        aggregation=aggregation,
        max_users_per_site=100,
    )
    honest = [
        reply_from(k, site_update(float(k), [2, 2, 2, 2]), {"site-id": k, "num-examples": 10})
        for k in range(1, 5)
    ]
    bad = reply_from(9, sent, {"site-id": 9, "num-examples": users})
    arrays, _ = strategy.aggregate_train(3, [*honest, bad])
    return strategy, {k: v.numpy() for k, v in arrays.items()}


def test_the_median_keeps_a_crafted_item_row_within_the_honest_sites_values():
    """A PipAttack-style update (a huge bias and embedding for one target item, with the
    largest count its users can have) moves the count-weighted mean anywhere, the median
    not past the honest sites' values."""
    crafted = site_update(0.0, [0, 0, 0, 10])  # all 10 of its users touched the target
    crafted["item_bias.weight"][3] = 1e4
    crafted["item_embedding.weight"][3] = 1e4
    _, mean = item_side_round("mean", crafted)
    _, median = item_side_round("median", crafted)
    assert mean["item_bias.weight"][3, 0] > 1e3
    assert 1.0 <= median["item_bias.weight"][3, 0] <= 4.0
    embedding = median["item_embedding.weight"]
    assert np.all((embedding >= 1.0) & (embedding <= 4.0))
    np.testing.assert_allclose(median["dense.weight"], 2.0)  # median of 0, 1, 2, 3, 4


def test_the_trimmed_mean_cuts_a_crafted_item_row_and_averages_the_honest_sites():
    """Flower's trimmed mean with one site cut at each end: the crafted row is cut, and a
    coordinate no site crafted is the mean of the three middle values."""
    crafted = site_update(0.0, [0, 0, 0, 10])
    crafted["item_bias.weight"][3] = 1e4
    _, trimmed = item_side_round("trimmed-mean", crafted)
    np.testing.assert_allclose(trimmed["item_bias.weight"][3, 0], 3.0)  # mean of 2, 3, 4
    np.testing.assert_allclose(trimmed["dense.weight"], 2.0)  # mean of 1, 2, 3


@pytest.mark.parametrize("sites", [2, 3, 4, 7, 10, 13])
def test_the_trimmed_mean_cuts_exactly_one_site_at_each_end(sites):
    """Honest values 1..S-1 and one site at 1e6: from 3 sites on, one site is cut at each end
    (the mean of 2..S-2); with 2 sites there is nothing to cut and it is the mean."""
    strategy = ItemSideFedAvg(
        global_arrays(), dp=True, min_sites=sites, book=RoundBook(), aggregation="trimmed-mean"
    )
    values = [*range(1, sites), 1e6]
    average = strategy.average([(site_update(v), MetricRecord()) for v in values])
    expected = np.mean(values) if sites < 3 else np.mean(values[1:-1])
    np.testing.assert_allclose(average["dense.weight"], expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("users", "counts"),
    [(1000, [2, 2, 2, 2]), (10, [2, 2, 2, 50])],
    ids=["more-users-than-max-users-per-site", "more-interactions-with-an-item-than-users"],
)
def test_counts_no_site_of_max_users_per_site_users_can_have_are_rejected(users, counts):
    strategy, arrays = item_side_round("mean", site_update(100.0, counts), users=users)
    assert "max-users-per-site = 100" in strategy.book.rounds[3].rejected["site 9"]
    np.testing.assert_allclose(arrays["dense.weight"], 2.5)  # the honest sites' mean


def test_item_side_aggregation_is_the_trimmed_mean_unless_secure_aggregation_gives_the_sum():
    assert default_config(dp=False).aggregation == "trimmed-mean"
    secure = default_config(target_epsilon=8.0, secure_aggregation=True)
    assert secure.aggregation == "mean"
    with pytest.raises(InputError, match="item-side-aggregation: secure aggregation"):
        secure.replace(item_side_aggregation="median")
    with pytest.raises(InputError, match="item-side-aggregation: secure aggregation"):
        secure.replace(item_side_aggregation="trimmed-mean")


def test_a_run_goes_on_without_a_rejected_site_and_its_report_names_it(tmp_path):
    """Three sites, site 2 sends NaN statistics in both statistics rounds: the run completes
    with the others, and metrics.json, the report's JSON and its text name the site and the
    check."""

    def poisoned(msg, context, call_next):
        reply = call_next(msg, context)
        records = reply.content.array_records
        if int(context.node_config["partition-id"]) == 2 and ARRAYS in records:
            sent = {k: v.numpy() for k, v in records[ARRAYS].items()}
            if STATISTICS in sent:
                sent[STATISTICS] = np.full_like(sent[STATISTICS], np.nan)
                records[ARRAYS] = ArrayRecord({k: Array(v) for k, v in sent.items()})
        return reply

    config = default_config(
        min_sites=3,
        dp=False,
        item_graph="filter",
        synthetic_users=120,
        synthetic_items=60,
        run_dir=str(tmp_path / "runs"),
        site_state_dir=str(tmp_path / "sites"),
    )
    run_dir = simulate(config, 3, tmp_path, make_app([poisoned, secure_aggregation_mod]))
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    rejected = json.loads((run_dir / "metrics.json").read_text())["1"]["rejected"]
    assert list(rejected) == ["site 2"] and "NaN" in rejected["site 2"]
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert [r["round"] for r in report["rejected"]["site 2"]] == [1, 2]
    text = (run_dir / "privacy_report.md").read_text()
    assert "- site 2 in round(s) 1-2: the statistics hold NaN or infinite values" in text
