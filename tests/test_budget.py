"""Budget enforcement across runs, the privacy report, and the `fedgraphrec` commands.

One in-process simulation: the dataset's ledger starts with budget spent in an
earlier run, every site may spend at most epsilon 4. In simulation every site
shares the dataset's ledger (a new partition can move any user to any site), so
all three decline together once the next round would pass 4, and the server
must stop when nobody can train.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import warnings
from dataclasses import replace
from functools import partial

import pytest
from flower_helpers import simulate
from test_user_randomness import synthetic_csv

from cli import main as fedgraphrec
from client.site_state import SiteState
from common.accounting import epsilon
from common.config import default_config
from common.data import load_site
from common.model import item_side_size
from common.privacy import ledger_entry, site_mechanism
from server.report import AGREEMENT_TOLERANCE, SCHEMA
from server.report_render import render_html, round_line, summary
from server.round_book import RoundLog


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("budget")
    (base / "messages").mkdir()
    config = default_config(
        item_graph="none",
        num_server_rounds=4,
        min_sites=3,
        max_epsilon=4.0,
        delta=1e-5,
        run_dir=str(base / "runs"),
        site_state_dir=str(base / "sites"),
        synthetic_users=300,
    )
    site = load_site(config, 0, 3)
    mechanism = site_mechanism(config, item_side_size(site.catalogue, config))
    SiteState.in_simulation(config.site_state_dir, site).record(
        partial(
            ledger_entry,
            mechanism,
            mechanism.training(),
            run="an-earlier-run",
            server_round=1,
            trained=True,
        )
    )
    return config, simulate(config, 3, base / "messages")


def test_sites_decline_at_max_epsilon_and_the_server_stops(budget_run):
    config, run_dir = budget_run
    ledger = json.loads((run_dir / "ledger.json").read_text())
    declined = {
        site: [e["round"] for e in entries if e["declined"]]
        for site, entries in ledger["sites"].items()
    }
    assert declined == {"0": [2], "1": [2], "2": [2]}
    assert ledger["stopped-after-round"] == 2
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "stopped-budget" and not (run_dir / "recommender.json").exists()
    assert "nan" not in status["reason"]
    assert status["reason"].startswith(
        f"stopped after round 2: no site can train within max-epsilon = {config.max_epsilon:g} "
        "(site 0 at epsilon "
    )
    mechanism = site_mechanism(config, 0)
    for entries in ledger["sites"].values():
        assert all(e["epsilon"] <= config.max_epsilon for e in entries)
        # Round 1 composes with the earlier run: 20 steps, not 10, then one metric release.
        training, evaluation = entries[0], entries[1]
        assert (training["message"], evaluation["message"]) == ("train", "evaluate")
        steps = replace(mechanism.training().event, steps=20)
        assert training["epsilon"] == pytest.approx(epsilon([steps], config.delta, "prv"))
        with_metrics = epsilon([steps, mechanism.evaluation().event], config.delta, "prv")
        assert evaluation["epsilon"] == pytest.approx(with_metrics)
        assert training["earlier-epsilon"] == evaluation["earlier-epsilon"] > 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["2"]["train"] == {} and sorted(metrics["2"]["declined"]) == ["0", "1", "2"]
    assert "3" not in metrics or not metrics["3"]["train"]


def test_the_site_ledger_on_disk_holds_every_run(budget_run):
    config, run_dir = budget_run
    entries = SiteState.in_simulation(config.site_state_dir, load_site(config, 0, 3)).ledger()
    assert [(e.run, e.round, e.release, e.trained) for e in entries] == [
        ("an-earlier-run", 1, "dp-sgd", True),
        (run_dir.name, 1, "dp-sgd", True),
        (run_dir.name, 1, "evaluation", True),
        (run_dir.name, 2, "dp-sgd", False),
    ]


def test_privacy_report_json_md_and_html(budget_run):
    _, run_dir = budget_run
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert report["schema"] == SCHEMA and report["dp"] is True
    assert report["privacy-unit"] == "one user with all their interactions at one site"
    assert report["stopped-after-round"] == 2
    ledger = json.loads((run_dir / "ledger.json").read_text())
    for site_id, site in report["sites"].items():
        assert site["rounds-trained"] == [1] and site["rounds-declined"] == [2]
        assert site["metric-releases"] == [1]
        assert site["relative-gap"] < AGREEMENT_TOLERANCE and site["epsilon"] <= 4.0
        # the headline epsilon includes the metric release, the site's last release
        (release,) = [e for e in ledger["sites"][site_id] if e["message"] == "evaluate"]
        assert site["epsilon"] == release["epsilon"] > ledger["sites"][site_id][0]["epsilon"]
    assert report["largest-epsilon"] == max(s["epsilon"] for s in report["sites"].values())
    assert [r["key"] for r in report["releases"] if not r["covered"]] == []
    assert report["warnings"] == [] and report["mechanism"]["evaluation"] == "dp"
    # a part whose noisy user count falls below 1 gives no metric (about 0.4 % of runs
    # here: 300 users, noise std 112 on the count), so one of the two parts is required
    assert report["utility"]["final-round"] == 1
    assert {"val-rmse", "test-rmse"} & set(report["utility"]["final"])

    markdown = (run_dir / "privacy_report.md").read_text()
    for heading in (
        "## Budget spent per site",
        "## What each site sent",
        "## Utility",
        "## Assumptions",
    ):
        assert heading in markdown
    page = (run_dir / "privacy_report.html").read_text()
    assert not re.search(r"(src|href)=\"(?!data:)", page), "the page must be self-contained"
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2  # one metric release before the stop: no privacy-utility path
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)


def test_report_command_rerenders_from_the_ledger(budget_run, capsys):
    _, run_dir = budget_run
    (run_dir / "privacy_report.md").unlink()
    assert fedgraphrec(["report", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "check (dp-accounting)" in printed and "stopped after round 2" in printed
    assert (run_dir / "privacy_report.md").is_file()
    assert fedgraphrec(["report", str(run_dir / "nope")]) == 2


def test_the_report_and_log_of_1000_sites_stay_readable(budget_run):
    """At 1,000 sites the epsilon plot's legend (one entry per site) did not fit the figure,
    and matplotlib warned in every such run's log; each round's log line named every site.
    Past 10 sites the plot drops its legend (the lines stay) and the line counts them."""
    _, run_dir = budget_run
    report = json.loads((run_dir / "privacy_report.json").read_text())
    site = next(iter(report["sites"].values()))
    report["sites"] = {str(k): site for k in range(1000)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        page = render_html(report)
    assert page.count("<img") == 2
    many = RoundLog(train={k: {} for k in range(1000)}, declined={1000: {}})
    assert round_line(3, many) == "Round 3: trained 1,000 sites; declined site 1000; no evaluation"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed")
def test_html_report_renders_in_headless_chromium(budget_run, tmp_path):
    _, run_dir = budget_run
    screenshot = tmp_path / "report.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={screenshot}",
            "--window-size=1200,2400",
            (run_dir / "privacy_report.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert screenshot.stat().st_size > 50_000  # tables and three plots, not a blank page


def test_a_new_seed_continues_the_datasets_ledger(tmp_path):
    """A new seed repartitions the same users: the second run's report shows the first
    run's epsilon under earlier runs, and its total composes both runs' releases."""
    data = synthetic_csv(tmp_path / "data.csv")
    items = tmp_path / "items.csv"
    items.write_text("item\n" + "".join(f"{i}\n" for i in range(90)))
    reports, mechanisms = [], []
    for seed in (0, 1):
        config = default_config(
            dataset="csv",
            data_path=str(data),
            item_text_path=str(items),
            rating_scale="1..5",
            task="ranking",
            seed=seed,
            min_sites=2,
            delta=1e-5,
            run_dir=str(tmp_path / "runs"),
            site_state_dir=str(tmp_path / "sites"),
        )
        (tmp_path / f"messages-{seed}").mkdir()
        run_dir = simulate(config, 2, tmp_path / f"messages-{seed}")
        reports.append(json.loads((run_dir / "privacy_report.json").read_text()))
        mechanisms.append(site_mechanism(config, 0))
    first, second = reports
    releases = [
        *(mechanisms[0].statistics(r, 1, 1.0).event for r in (1, 2)),
        *(mechanisms[0].evaluation().event for _ in (1, 2)),  # the baseline, the graph
    ]
    one_run = epsilon(releases, 1e-5, "prv")
    both_runs = epsilon(releases * 2, 1e-5, "prv")
    for site in first["sites"].values():
        assert site["epsilon"] == pytest.approx(one_run) and site["earlier-epsilon"] == 0
    for site in second["sites"].values():
        assert site["earlier-epsilon"] == pytest.approx(first["largest-epsilon"])
        assert site["run-epsilon"] == pytest.approx(one_run)
        assert site["epsilon"] == pytest.approx(both_runs) and both_runs > 1.2 * one_run
    assert "WARNING: earlier runs" not in summary(first)
    warning = summary(second).splitlines()[-1]  # the run's last lines say so
    assert warning.startswith("WARNING: earlier runs on this data had spent epsilon (site 0 ")
    assert warning.endswith("max-epsilon = 30.0 caps them")
