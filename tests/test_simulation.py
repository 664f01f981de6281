"""End to end: Flower's simulation engine in process, and the `flwr run` CLI.

The in-process run also records every message each site sends (a client mod
writes a summary of each reply to disk), and checks it against the release
inventory: only item-side arrays, no user-sized array, no counts with DP on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from flower_helpers import child_environment, free_port, simulate, stop_processes_of

import cli
from client.app import make_app
from common.config import default_config
from common.data import load_site
from common.data.synthetic import generate_synthetic
from common.errors import InputError
from common.graph.features import GraphFeatures
from common.graph.release import ItemGraph, rating_settings
from common.model import build_model
from common.privacy import LEDGER_METRICS, released_quantities
from common.protocol import ITEM_SIDE, STATISTICS
from server.round_book import NoSiteCompleted

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("dp-run")
    (base / "messages").mkdir()
    config = default_config(
        item_graph="none",
        num_server_rounds=3,
        min_sites=3,
        run_dir=str(base / "runs"),
        site_state_dir=str(base / "sites"),
        private_user_embedding=True,
        delta=1e-5,
        cold_item_fraction=0.1,
        evaluation="exact",  # to compare rounds on 600 users; the noisy release: graph_run
    )
    return config, simulate(config, 3, base / "messages"), base / "messages"


def test_three_sites_three_rounds_improve_on_round_zero(dp_run):
    config, run_dir, _ = dp_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert sorted(metrics) == ["0", "1", "2", "3"]
    for server_round in ("1", "2", "3"):
        assert sorted(metrics[server_round]["train"]) == ["0", "1", "2"]
        assert metrics[server_round]["rejected"] == {} and metrics[server_round]["failed"] == {}
    assert metrics["3"]["aggregated"]["val-rmse"] < metrics["0"]["aggregated"]["val-rmse"]
    assert {"cold-rmse", "cold-rmse-without-text"} <= set(metrics["3"]["aggregated"])

    ledger = json.loads((run_dir / "ledger.json").read_text())
    for site in ("0", "1", "2"):
        entries = ledger["sites"][site]
        assert [e["round"] for e in entries] == [1, 2, 3]
        epsilon = [e["epsilon"] for e in entries]
        assert epsilon == sorted(epsilon) and epsilon[0] > 0
        assert all(e["delta"] == 1e-5 and not e["declined"] for e in entries)
    assert json.loads((run_dir / "config.json").read_text()) == config.to_mapping()
    assert (run_dir / "model.pt").is_file()


def test_every_message_a_site_sends_is_item_side_or_declared(dp_run):
    config, _, messages = dp_run
    replies = [json.loads(p.read_text()) for p in messages.glob("*.json")]
    assert {r["type"] for r in replies} == {"train", "evaluate"}
    assert len([r for r in replies if r["type"] == "train"]) == 3 * 3

    site = load_site(config, 0, 3)
    item_side = {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        for k, v in build_model(site.catalogue, config).state_dict().items()
    }
    sizes = {load_site(config, s, 3).num_users for s in range(3)}
    declared = {(r.message, r.record, r.key): r for r in released_quantities(config)}
    for reply in replies:
        assert reply["configs"] == [], "no ConfigRecord may leave a site"
        if reply["type"] == "train":
            assert reply["records"] == ["arrays", "metrics"]
            assert reply["arrays"] == item_side, "only the item side, with its global shapes"
            assert (reply["type"], "arrays", ITEM_SIDE) in declared
        else:
            assert reply["records"] == ["metrics"]
        for key in reply["metrics"]:
            assert (reply["type"], "metrics", key) in declared, key
        # With DP on no exact count leaves a site.
        assert "num-examples" not in reply["metrics"]
        for shape in (a["shape"] for a in reply["arrays"].values()):
            assert not sizes & set(shape), "no array may have one row per user"


@pytest.fixture(scope="module")
def graph_run(tmp_path_factory):
    """The default pipeline (the item graph's filter) on the ranking task, 3 sites, DP."""
    base = tmp_path_factory.mktemp("graph-run")
    (base / "messages").mkdir()
    config = default_config(
        task="ranking",
        min_sites=3,
        target_epsilon=8.0,
        item_graph_items=150,
        run_dir=str(base / "runs"),
        site_state_dir=str(base / "sites"),
    )
    return config, simulate(config, 3, base / "messages"), base / "messages"


def test_the_item_graph_rounds_release_only_declared_statistics_of_public_size(graph_run):
    config, run_dir, messages = graph_run
    replies = [json.loads(p.read_text()) for p in messages.glob("*.json")]
    train = [r for r in replies if r["type"] == "train"]
    assert len(train) == 2 * 3  # two statistics rounds, no DP-SGD round
    n, m = 400, 150
    lengths = sorted({tuple(r["arrays"][STATISTICS]["shape"]) for r in train})
    assert lengths == [(n,), (m * (m + 1) // 2,)]  # public: degrees, then the Gram's isometry
    declared = {(r.message, r.record, r.key) for r in released_quantities(config)}
    for reply in replies:
        assert reply["configs"] == [], "no ConfigRecord may leave a site"
        assert all((reply["type"], "arrays", key) in declared for key in reply["arrays"])
        assert all((reply["type"], "metrics", key) in declared for key in reply["metrics"])
        assert "num-examples" not in reply["metrics"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert sorted(metrics) == ["0", "1", "2"]
    assert metrics["0"]["aggregated"] == {}
    # round 0 is the sites' check-in (their ids alone); round 1's metrics (the baseline,
    # MostPop by the released degrees) and round 2's (the filter) come from noisy
    # per-user sums only (common.metric_release)
    evaluated = [r for r in replies if r["type"] == "evaluate" and len(r["metrics"]) > 1]
    assert len(evaluated) == 2 * 3 and len(replies) == 2 * 3 + 3 * 3
    assert 0 < metrics["1"]["aggregated"]["val-ndcg@20"] < 1
    assert all(set(r["metrics"]) >= {"val-ndcg@20-sum", "val-users", "epsilon"} for r in evaluated)
    assert not any("val-ndcg@20" in r["metrics"] for r in evaluated)
    assert 0 < metrics["2"]["aggregated"]["val-ndcg@20"] < 1
    report = json.loads((run_dir / "privacy_report.json").read_text())
    for site in report["sites"].values():  # the target includes the metric release
        assert 7.7 <= site["epsilon"] <= 8.0 and site["relative-gap"] < 0.02
        assert site["metric-releases"] == [1, 2]
    assert [r for r in report["releases"] if not r["covered"]] == []
    assert report["utility"]["round-labels"] == {
        "0": "check-in (nothing scored)",
        "1": "baseline: MostPop",
        "2": "item graph (the filter)",
    }
    markdown = (run_dir / "privacy_report.md").read_text()  # only the mechanisms that ran
    assert "| 1 | baseline: MostPop | " in markdown
    assert "baseline (round 1): MostPop, scored on the same split from round 1's released " in (
        markdown
    )
    assert "- DP-SGD: none (no training rounds" in markdown
    assert "- DP-SGD: sampling rate" not in markdown
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert {e["steps"] for entries in ledger["sites"].values() for e in entries} == {1}


def small_run(tmp_path, **changes) -> tuple:
    """Two sites of 120 synthetic users under ``changes``: the configuration, the run
    directory and every reply the sites sent."""
    (tmp_path / "messages").mkdir()
    config = default_config(
        min_sites=2,
        run_dir=str(tmp_path / "runs"),
        site_state_dir=str(tmp_path / "sites"),
        synthetic_users=120,
        synthetic_items=60,
        **changes,
    )
    run_dir = simulate(config, 2, tmp_path / "messages")
    replies = [json.loads(p.read_text()) for p in (tmp_path / "messages").glob("*.json")]
    return config, run_dir, replies


def test_new_users_and_items_of_a_test_file_are_scored_and_reported_all_and_warm(tmp_path):
    """Issue 27.4: a test file whose users 0-2 and item 59 have no training rows. Nothing
    is refused or dropped: the run reports test metrics over every row and over the warm
    ones, and a new user's prediction is the released global mean plus the item offset."""
    data = generate_synthetic(num_users=120, num_items=60, seed=1).interactions
    test = (np.arange(len(data)) % 10 == 0) | np.isin(data.user, [0, 1, 2]) | (data.item == 59)
    for name, rows in (("train", ~test), ("test", test)):
        columns = (data.user[rows], data.item[rows], data.rating[rows])
        lines = ["user,item,rating"] + [f"{u},{i},{r:g}" for u, i, r in zip(*columns, strict=True)]
        (tmp_path / f"{name}.csv").write_text("\n".join(lines) + "\n")
    config, run_dir, _ = small_run(
        tmp_path,
        dataset="csv",
        data_path=str(tmp_path / "train.csv"),
        test_path=str(tmp_path / "test.csv"),
        split="canonical",
        item_graph="filter",
        dp=False,
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())["2"]
    assert {"test-rmse", "test-rmse-warm"} <= set(metrics["aggregated"])
    evaluated = [m for m in metrics["evaluate"].values()]
    assert sum(m["num-examples"] for m in evaluated) == 120  # every user, the new ones too
    graph = ItemGraph.from_bytes((run_dir / "item_graph.npz").read_bytes())
    sites = [load_site(config, k, 2) for k in range(2)]
    site = next(s for s in sites if len(s.test) != len(s.warm_test))
    assert sum(len(s.test) for s in sites) == int(test.sum())
    new_user = int(np.flatnonzero(np.bincount(site.train.user, minlength=site.num_users) == 0)[0])
    pairs = site.test.select(site.test.user == new_user)
    predicted = GraphFeatures(graph, site, rating_settings(config)).predict(pairs)
    expected = graph.global_mean + graph.item_bias[pairs.item]
    np.testing.assert_allclose(predicted, site.catalogue.from_reference_scale(expected), rtol=1e-5)


def test_with_evaluation_off_no_metric_leaves_a_site(tmp_path):
    config, run_dir, replies = small_run(tmp_path, task="ranking", evaluation="off")
    train = [r for r in replies if r["type"] == "train"]
    check_in = [r for r in replies if r["type"] == "evaluate"]  # round 0: the site's id
    assert len(train) == 2 * 2 and len(check_in) == 2
    assert all(set(r["metrics"]) <= {*LEDGER_METRICS, "declined", "site-id"} for r in train)
    assert all(set(r["metrics"]) == {"site-id"} for r in check_in)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert all(m["aggregated"] == {} for m in metrics.values())
    assert [sorted(m["evaluate"]) for m in metrics.values()] == [["0", "1"], [], []]
    evaluate = [r.key for r in released_quantities(config) if r.message == "evaluate"]
    assert evaluate == ["site-id"]


def test_epsilon_sent_is_a_function_of_public_configuration_only(dp_run):
    """Sites of different sizes report the same epsilon: it reveals nothing about them."""
    config, _, messages = dp_run
    sizes = [load_site(config, s, 3).num_users for s in range(3)]
    assert len(set(sizes)) > 1 or sizes[0] > 0
    replies = [json.loads(p.read_text()) for p in messages.glob("*.json")]
    epsilons = {}
    for reply in replies:
        if reply["type"] == "train":
            epsilons.setdefault(round(reply["metrics"]["epsilon"], 9), set()).add(
                reply["partition-id"]
            )
    assert len(epsilons) == 3  # one value per round, shared by all three sites
    assert all(sites == {0, 1, 2} for sites in epsilons.values())


def test_without_dp_counts_are_sent_and_declared_not_covered(tmp_path):
    changes = {"item_graph": "none", "dp": False, "num_server_rounds": 1}
    config, run_dir, replies = small_run(tmp_path, **changes)
    train = [r for r in replies if r["type"] == "train"]
    assert all("item-counts" in r["arrays"] and "num-examples" in r["metrics"] for r in train)
    not_covered = {r.key for r in released_quantities(config) if not r.covered}
    assert {"item-counts", "num-examples", "train-loss", ITEM_SIDE} <= not_covered
    releases = json.loads((run_dir / "releases.json").read_text())
    assert {r["key"] for r in releases if not r["covered"]} == not_covered


def failed_run(tmp_path, error, match, client_app=None, **changes) -> tuple[Path, dict]:
    """A run of 2 sites that must raise ``error``: its run directory and ``status.json``."""
    config = default_config(
        synthetic_users=120,
        run_dir=str(tmp_path / "runs"),
        site_state_dir=str(tmp_path / "sites"),
        **changes,
    )
    with pytest.raises(error, match=match):
        simulate(config, 2, tmp_path / "messages", client_app=client_app)
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir, json.loads((run_dir / "status.json").read_text())


def test_a_run_no_site_can_complete_stops_at_once_and_is_marked_failed(tmp_path):
    def broken(msg, context, call_next):
        raise RuntimeError("the site's disk is full")

    run_dir, status = failed_run(
        tmp_path,
        NoSiteCompleted,
        "no site completed round 0",
        make_app([broken]),
        item_graph="none",
        num_server_rounds=3,
    )
    assert status["status"] == "failed"
    assert "no site completed round 0" in status["reason"]
    # sites named by their id, one short reason each (the same one said once)
    assert status["reason"].endswith("round 0 (site 0, site 1: the site's disk is full)")
    assert list(json.loads((run_dir / "metrics.json").read_text())) == ["0"]
    assert "NoSiteCompleted: no site completed round 0" in (run_dir / "traceback.txt").read_text()


def test_a_filter_setting_the_release_refuses_fails_the_run_before_any_site_spends(tmp_path):
    """EASE's part under DP: refused when the run starts, not after round 1's release."""
    _, status = failed_run(
        tmp_path,
        InputError,
        "item-graph-ease-weight: EASE's part needs",
        task="ranking",
        item_graph="filter",
        item_graph_ease_weight=1.0,
    )
    assert status["status"] == "failed" and "item-graph-ease-weight" in status["reason"]
    messages = tmp_path / "messages"
    assert not messages.exists() or not any(messages.iterdir())  # no site replied


def test_fedgraphrec_run_exits_by_the_runs_outcome_and_logs_once(tmp_path, capsys):
    """Three runs through `fedgraphrec run` (which submits through the `flwr` CLI, with an
    isolated FLWR_HOME): a good one, exit 0, whose log has one line per event (round 0
    included, plain numbers); one with a missing data file, exit 1, a failed status.json
    and the reason as the last line; and one with a mistyped key, exit 2 before anything
    is submitted, naming the closest real key. (`flwr run --stream` itself exits 0 for
    every one of them in Flower 1.42.)"""
    flwr_home = tmp_path / "flwr-home"
    env = child_environment(
        FLWR_HOME=str(flwr_home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
    )
    runs = tmp_path / "runs"
    flwr = str(Path(sys.executable).with_name("flwr"))

    def flwr_run(overrides: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "cli", "run", str(REPO), "--run-config"]
        command.append(f'{overrides} run-dir="{runs}" site-state-dir="{tmp_path / "sites"}"')
        return subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
        )

    try:
        good = flwr_run('item-graph="filter" synthetic-users=150')
        bad = flwr_run(f'dataset="csv" data-path="{tmp_path / "missing.csv"}"')
        mistyped = flwr_run("item-graf=1")
        listed = subprocess.run(
            [flwr, "ls", "--format", "json"], env=env, capture_output=True, text=True, cwd=tmp_path
        )
    finally:
        stopped = stop_processes_of(flwr_home)
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-3000:]
    assert stopped, "flwr run leaves a SuperLink running; the test must have stopped it"
    assert not any(
        str(flwr_home) in " ".join(p.info["cmdline"] or [])
        for p in psutil.process_iter(["cmdline"])
    )
    log = good.stdout.splitlines()
    for event in ("Round 0:", "Round 1:", "Round 2:", "Summary:", "Run directory:"):
        assert sum(event in line for line in log) == (2 if event == "Run directory:" else 1)
    assert "np.float64" not in good.stdout and "Weighted by" not in good.stdout

    statuses = {d: json.loads((d / "status.json").read_text()) for d in runs.iterdir()}
    assert sorted(s["status"] for s in statuses.values()) == ["completed", "failed"]
    (run_dir,) = [d for d, status in statuses.items() if status["status"] == "completed"]
    metrics = json.loads((run_dir / "metrics.json").read_text())  # the default item graph
    assert sorted(metrics) == ["0", "1", "2"]
    assert sorted(metrics["1"]["train"]) == sorted(metrics["2"]["train"]) == ["0", "1"]
    assert sorted(metrics["2"]["evaluate"]) == ["0", "1"]  # noisy sums of 150 users
    assert "val-squared-error-sum" in metrics["2"]["evaluate"]["0"]
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert report["mechanism"]["delta"] == 1e-6 and sorted(report["sites"]) == ["0", "1"]
    assert (run_dir / "privacy_report.html").is_file()
    assert cli.main(["recommend", str(run_dir), "--data", "--user", "7", "-k", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 3  # what flwr run . saved serves

    reason = f"{tmp_path / 'missing.csv'}: file not found"
    assert bad.returncode == 1 and f"Run failed: {reason}" in bad.stdout
    assert f"RunFailed: {reason}" in bad.stdout and "_parse.py" not in bad.stdout  # no stack
    assert bad.stderr.splitlines()[-1].startswith(f"fedgraphrec: run failed: {reason}")
    failed = next(s for s in statuses.values() if s["status"] == "failed")
    assert failed["reason"].startswith(reason)  # the folder exists before the data is read
    assert mistyped.returncode == 2 and mistyped.stdout == ""
    assert "'item-graf' (did you mean 'item-graph'?)" in mistyped.stderr
    statuses = [r["status"] for r in json.loads(listed.stdout)["runs"]]
    assert sorted(statuses) == ["finished:completed", "finished:failed"]
