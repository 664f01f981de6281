"""The Flower ServerApp: builds the global item side and runs the rounds.

The global catalogue comes from ``catalogue-path`` in deployment (the folder
``fedgraphrec partition`` writes for the coordinator) or from the configured
dataset in simulation; every message carries its fingerprint so that sites
can check they hold the same one. Round 0 evaluates the initial model at every
site, so later rounds have a baseline; then every round trains at the sites,
aggregates the item side (``server.strategy``), evaluates, and rewrites the run
directory (``server.run_directory``). With an item graph the first two rounds
are its statistics rounds (``server.item_graph``), and with ``item-graph =
"filter"`` there are no others. With ``secure-aggregation = true`` the rounds
after round 0 run through SecAgg+ instead (``server.secure_aggregation``).

A run that cannot work stops at once and is marked failed: invalid
configuration or data, or a round that no site completed
(``server.round_book.NoSiteCompleted``). The ServerApp then raises, so Flower
marks the run failed (``flwr ls``), ``status.json`` in the run directory says
``failed`` with the reason, and the log's last line says why. A round in which
only some sites fail goes on with the others.
"""

from __future__ import annotations

import json
import traceback
from logging import ERROR, INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.data import load_dataset
from common.data.site_folder import catalogue_folder_dataset, load_catalogue_folder
from common.errors import InputError
from common.graph.release import ranking_filter
from common.model import build_model
from common.privacy import site_mechanism
from common.protocol import instruction_values
from server.item_graph import GraphRelease
from server.report import write_report
from server.report_render import round_line, summary
from server.round_book import RoundBook
from server.run_directory import RunDirectory
from server.secure_aggregation import run_secure_aggregation
from server.strategy import ItemSideFedAvg

app = ServerApp()


class RunFailed(RuntimeError):
    """Raised by the ServerApp with the run's one-line reason (the traceback is in the
    run folder's ``traceback.txt``), so that Flower marks the run failed and its log
    ends with the reason rather than with our stack."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        config = RunConfig.from_mapping(context.run_config)
    except InputError as error:
        log(ERROR, "Run failed: %s", error)
        raise RunFailed(str(error)) from None
    try:
        run_dir = run(grid, config, context)
    except Exception as error:
        raise RunFailed(failure_reason(error)) from None
    status = json.loads((run_dir / "status.json").read_text())
    if status["status"] != "completed":  # e.g. stopped-budget: the run did not train
        raise RunFailed(status["reason"])


def failure_reason(error: Exception) -> str:
    """One line: the message of an input error, else the exception's type and message."""
    return str(error) if isinstance(error, InputError) else f"{type(error).__name__}: {error}"


def run(
    grid: Grid, config: RunConfig, context: Context | None = None, keep_models: bool = False
) -> Path:
    """Run the federation; returns the run directory.

    ``context`` is the ServerApp's context; only secure aggregation (Flower's
    legacy workflow) needs it. ``keep_models`` keeps every round's model in the
    run directory (benchmarks choose a round by validation).
    """
    out = RunDirectory.create(config, folder_name(config), keep_models)
    log(INFO, "Run directory: %s", out.path)
    try:
        if config.catalogue_path:
            catalogue = load_catalogue_folder(config.catalogue_path)
            dataset = catalogue_folder_dataset(config.catalogue_path)
        else:
            loaded = load_dataset(config)
            catalogue, dataset = loaded.catalogue, loaded.name
        out.describe(dataset, catalogue)
        if config.task == "ranking" and config.statistics_rounds:
            ranking_filter(config, catalogue.num_items)  # a refused setting fails before round 1
        torch.manual_seed(config.seed)
        model = build_model(catalogue, config)
        if config.initial_model:
            load_initial_model(model, config.initial_model)
        mechanism = site_mechanism(config, model.size)  # fails here if the budget cannot work
    except InputError as error:
        out.finish(failed=str(error), trace=traceback.format_exc())
        log(ERROR, "Run failed: %s (run directory %s)", error, out.path)
        raise
    instruction = instruction_values(config, out.path.name, catalogue.fingerprint())
    book = RoundBook()
    release = GraphRelease(config, catalogue, mechanism, out)
    try:
        arrays = ArrayRecord(model.state_dict())
        strategy = ItemSideFedAvg(
            arrays,
            config.dp,
            config.min_sites,
            book,
            config.evaluates_in,
            release,
            config.min_sites_to_continue,
            config.site_timeout,
            config.aggregation,
            config.max_users_per_site,
        )
        evaluate(grid, strategy, 0, arrays, instruction, config)
        end_of_round(0, arrays, book, out)
        if config.secure_aggregation:
            run_secure_aggregation(
                grid, context, config, model, mechanism, instruction, out, book, release
            )
        else:
            for server_round in range(1, config.total_rounds + 1):
                replies = grid.send_and_receive(
                    strategy.configure_train(server_round, arrays, ConfigRecord(instruction), grid),
                    timeout=config.round_timeout,
                )
                arrays = strategy.aggregate_train(server_round, replies)[0] or arrays
                if book.stopped_after is None:
                    evaluate(grid, strategy, server_round, arrays, instruction, config)
                end_of_round(server_round, arrays, book, out)
                if book.stopped_after is not None:
                    break
    except Exception as error:
        reason = failure_reason(error)
        out.write_round(ArrayRecord(model.state_dict()), book)  # what happened, failures too
        out.finish(failed=reason, trace=traceback.format_exc())
        log(ERROR, "Run failed: %s (run directory %s)", reason, out.path)
        raise
    stopped = None
    if book.stopped_after is not None and book.stopped_early is None:
        spent = ", ".join(
            f"site {site} at epsilon {values.get('epsilon', float('nan')):.3f}"
            for site, values in sorted(book.round(book.stopped_after).declined.items())
        )
        stopped = (
            f"stopped after round {book.stopped_after}: no site can train within "
            f"max-epsilon = {config.max_epsilon:g} ({spent})"
        )
    out.finish(stopped=stopped)
    report = write_report(out.path)
    best = out.status.get("best-round")
    chosen = "" if best is None else f"Best validation round: {best} (best-model.pt)\n"
    log(INFO, "Summary:\n%s\n%sRun directory: %s", summary(report), chosen, out.path)
    if stopped is not None:
        log(WARNING, "Run %s", stopped)
    return out.path


def folder_name(config: RunConfig) -> str:
    """What the run's folder is named after, known before any data is read: the
    ``dataset`` key, or in deployment the dataset the coordinator's catalogue folder
    records (``"deployment"`` where it cannot be read: loading it then says why)."""
    if not config.catalogue_path:
        return config.dataset
    try:
        return catalogue_folder_dataset(config.catalogue_path)
    except (OSError, ValueError):
        return "deployment"


def evaluate(
    grid: Grid,
    strategy: ItemSideFedAvg,
    server_round: int,
    arrays: ArrayRecord,
    instruction: dict,
    config: RunConfig,
) -> None:
    """The federated evaluation of a round (none when the round does not evaluate)."""
    replies = grid.send_and_receive(
        strategy.configure_evaluate(server_round, arrays, ConfigRecord(instruction), grid),
        timeout=config.round_timeout,
    )
    strategy.aggregate_evaluate(server_round, replies)


def end_of_round(
    server_round: int, arrays: ArrayRecord, book: RoundBook, out: RunDirectory
) -> None:
    """Note the time, persist the run directory, log the round in one line; stop early
    when validation no longer improves (``RunDirectory.stop_if_no_gain``)."""
    book.finish(server_round)
    out.write_round(arrays, book)
    log(INFO, "%s", round_line(server_round, book.round(server_round)))
    out.stop_if_no_gain(server_round, book)


def load_initial_model(model: torch.nn.Module, path: str) -> None:
    """Start from the item side an earlier run saved (its ``model.pt``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"initial-model: {file} is not a file (expected a run's model.pt)")
    try:
        model.load_state_dict(torch.load(file))
    except RuntimeError as error:
        raise InputError(
            f"initial-model: {file} does not fit this configuration: {error}"
        ) from None
