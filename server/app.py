"""The Flower ServerApp: builds the global item side and runs the rounds.

The global catalogue comes from ``catalogue-path`` in deployment (the folder
``fedgraphrec partition`` writes for the coordinator) or from the configured
dataset in simulation; every message carries its fingerprint so that sites
can check they hold the same one. Round 0 evaluates the initial model at every
site, so later rounds have a baseline; then every round trains at the sites,
aggregates the item side (``server.strategy``), evaluates, and rewrites the run
directory (``server.run_directory``). With ``secure-aggregation = true`` the
rounds after round 0 run through SecAgg+ instead (``server.secure_aggregation``).
"""

from __future__ import annotations

from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.data import load_dataset
from common.data.site_folder import load_catalogue_folder
from common.errors import InputError
from common.model import build_model, item_side_size
from common.privacy import site_mechanism
from common.protocol import CATALOGUE_FINGERPRINT, RUN_NAME
from server.report import write_report
from server.report_render import summary
from server.round_book import RoundBook
from server.run_directory import RunDirectory
from server.secure_aggregation import run_secure_aggregation
from server.strategy import ItemSideFedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run(grid, RunConfig.from_mapping(context.run_config), context)


def run(
    grid: Grid, config: RunConfig, context: Context | None = None, keep_models: bool = False
) -> Path:
    """Run the federation; returns the run directory.

    ``context`` is the ServerApp's context; only secure aggregation (Flower's
    legacy workflow) needs it. ``keep_models`` keeps every round's model in the
    run directory (benchmarks choose a round by validation).
    """
    catalogue = (
        load_catalogue_folder(config.catalogue_path)
        if config.catalogue_path
        else load_dataset(config).catalogue
    )
    torch.manual_seed(config.seed)
    model = build_model(catalogue, config)
    if config.initial_model:
        load_initial_model(model, config.initial_model)
    arrays = ArrayRecord(model.state_dict())
    book = RoundBook()
    strategy = ItemSideFedAvg(arrays, config.dp, config.min_sites, book, config.evaluates_in)
    out = RunDirectory.create(config, keep_models)
    log(INFO, "Run directory: %s", out.path)
    instruction = config.to_mapping() | {
        RUN_NAME: out.path.name,
        CATALOGUE_FINGERPRINT: catalogue.fingerprint(),
    }

    replies = grid.send_and_receive(
        strategy.configure_evaluate(0, arrays, ConfigRecord(instruction), grid),
        timeout=config.round_timeout,
    )
    strategy.aggregate_evaluate(0, replies)
    out.write_round(arrays, book)
    if config.secure_aggregation:
        code = site_mechanism(config, item_side_size(catalogue, config)).code
        run_secure_aggregation(grid, context, config, model, code, instruction, out, book)
    else:
        strategy.start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=config.num_server_rounds,
            timeout=config.round_timeout,
            train_config=ConfigRecord(instruction),
            evaluate_config=ConfigRecord(instruction),
            evaluate_fn=lambda server_round, new_arrays: end_of_round(
                server_round, new_arrays, book, out
            ),
        )
    report = write_report(out.path)
    log(INFO, "Summary:\n%s\nRun directory: %s", summary(report), out.path)
    return out.path


def end_of_round(
    server_round: int, arrays: ArrayRecord, book: RoundBook, out: RunDirectory
) -> None:
    """Flower calls this after every round (as its evaluate_fn): note the time, persist."""
    book.finish(server_round)
    out.write_round(arrays, book)


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
