"""The run directory keeps the best validation round's model without DP, and under DP only
when the metrics were released under it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from flwr.app import ArrayRecord

from common.config import default_config
from common.data.dataset import Catalogue
from server.report import write_report
from server.round_book import RoundBook
from server.run_directory import RunDirectory

CATALOGUE = Catalogue(("a", "b"), None, (1.0, 2.0, 3.0, 4.0, 5.0))


def write_rounds(
    tmp_path, dp: bool, task: str, values: list[float], evaluation: str = "auto", **changes
) -> RunDirectory:
    """Rounds 0, 1, ... with validation metric ``values``, as the ServerApp ends each round
    (until training stops early); round r's model holds r."""
    metric = "val-rmse" if task == "rating" else "val-ndcg@20"
    config = default_config(
        item_graph="none", dp=dp, task=task, run_dir=str(tmp_path), evaluation=evaluation
    ).replace(**changes)
    out = RunDirectory.create(config, "synthetic")
    out.describe("synthetic", CATALOGUE)
    book = RoundBook()
    for server_round, value in enumerate(values):
        book.round(server_round).aggregated[metric] = value
        book.finish(server_round)
        out.write_round(ArrayRecord({"round": torch.tensor(float(server_round))}), book)
        out.stop_if_no_gain(server_round, book)
        if book.stopped_after is not None:
            break
    return out


@pytest.mark.parametrize(
    ("task", "values", "best"),
    [("rating", [1.2, 1.0, 0.95, 0.97, 0.99], 2), ("ranking", [0.01, 0.2, 0.3, 0.25], 2)],
)
def test_without_dp_the_best_validation_model_is_kept_and_named(tmp_path, task, values, best):
    out = write_rounds(tmp_path, dp=False, task=task, values=values)
    assert json.loads((out.path / "status.json").read_text())["best-round"] == best
    assert torch.load(out.path / "best-model.pt")["round"] == best
    assert torch.load(out.path / "model.pt")["round"] == len(values) - 1  # the last round


@pytest.mark.parametrize(("patience", "last"), [(2, 4), (3, 5), (0, 5)])
def test_without_dp_training_stops_when_validation_has_not_improved_for_a_while(
    tmp_path, patience, last
):
    """``early-stopping-rounds``: the best round is 2; with 2 training stops after round 4,
    with 3 it would after round 5, the last of the run's 5 training rounds, so it is not
    'stopped'; 0 never stops."""
    values = [0.01, 0.2, 0.3, 0.25, 0.22, 0.21]  # rounds 0 to 5, the last
    out = write_rounds(tmp_path, False, "ranking", values, early_stopping_rounds=patience)
    status = json.loads((out.path / "status.json").read_text())
    assert torch.load(out.path / "model.pt")["round"] == last
    assert status["best-round"] == 2
    assert ("stopped-early" in status) == (last == 4)
    if last == 4:
        assert "has not improved for 2 rounds since round 2" in status["stopped-early"]


def test_under_dp_training_never_stops_early(tmp_path):
    """Under DP the rounds are planned (and the metrics noisy): all of them run."""
    out = write_rounds(tmp_path, True, "rating", [1.2, 1.0, 1.1, 1.2, 1.3, 1.4])
    assert torch.load(out.path / "model.pt")["round"] == 5
    assert "stopped-early" not in json.loads((out.path / "status.json").read_text())


def test_under_dp_no_round_is_chosen_by_exact_metrics_outside_epsilon(tmp_path):
    out = write_rounds(tmp_path, dp=True, task="rating", values=[1.2, 1.0, 1.1], evaluation="exact")
    assert not (out.path / "best-model.pt").exists()
    assert "best-round" not in json.loads((out.path / "status.json").read_text())


def test_under_dp_the_round_is_chosen_by_metrics_released_under_dp(tmp_path):
    """Choosing by noisy metrics that the guarantee covers is post-processing."""
    out = write_rounds(tmp_path, dp=True, task="rating", values=[1.2, 1.0, 1.1])
    assert json.loads((out.path / "status.json").read_text())["best-round"] == 1


def test_the_report_says_first_when_the_catalogue_came_from_the_interactions(tmp_path):
    """Without DP a csv's items and scale may come from the data; the report says so."""
    config = default_config(item_graph="none", dp=False, run_dir=str(tmp_path))
    derived = replace(CATALOGUE, derived_from_data=("item ids", "rating scale"))
    out = RunDirectory.create(config, "ratings")
    out.describe("ratings", derived)
    out.write_round(ArrayRecord({"round": torch.tensor(0.0)}), RoundBook())
    out.finish()
    report = write_report(out.path)
    (warning,) = report["warnings"]
    assert "item ids and rating scale were taken from the interactions" in warning
    markdown = (out.path / "privacy_report.md").read_text().splitlines()
    assert markdown[2].startswith("**Warning.** The catalogue's item ids and rating scale")


@pytest.mark.parametrize(
    ("task", "values", "warned"),
    [
        ("rating", [0.90, 0.88, 0.93], True),
        ("rating", [0.90, 0.95, 0.89], False),
        ("ranking", [0.20, 0.25, 0.19], True),
    ],
)
def test_a_run_whose_last_round_validates_worse_than_its_first_says_so(
    tmp_path, task, values, warned
):
    out = write_rounds(tmp_path, dp=False, task=task, values=values)
    out.finish()
    warnings = write_report(out.path)["warnings"]
    assert bool(warnings) == warned
    if warned:
        assert "worse than round 0's" in warnings[0]
        assert "worse than round 0" in (out.path / "privacy_report.md").read_text()
