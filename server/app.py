"""The Flower ServerApp: builds the global item side and runs the rounds.

Round 0 evaluates the initial model at every site, so later rounds have a
baseline; then every round trains at the sites, aggregates the item side
(``server.strategy``), evaluates, and rewrites the run directory
(``server.run_directory``).
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
from common.model import build_model
from server.run_directory import RunDirectory, summary
from server.strategy import ItemSideFedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run(grid, RunConfig.from_mapping(context.run_config))


def run(grid: Grid, config: RunConfig) -> Path:
    """Run the federation; returns the run directory."""
    catalogue = load_dataset(config).catalogue
    torch.manual_seed(config.seed)
    arrays = ArrayRecord(build_model(catalogue, config).state_dict())
    strategy = ItemSideFedAvg(arrays, dp=config.dp, min_sites=config.min_sites)
    out = RunDirectory.create(config)
    log(INFO, "Run directory: %s", out.path)

    def message_config() -> ConfigRecord:
        return ConfigRecord(config.to_mapping())

    replies = grid.send_and_receive(strategy.configure_evaluate(0, arrays, message_config(), grid))
    strategy.aggregate_evaluate(0, replies)
    out.write_round(arrays, strategy)
    strategy.start(
        grid=grid,
        initial_arrays=arrays,
        num_rounds=config.num_server_rounds,
        train_config=message_config(),
        evaluate_config=message_config(),
        evaluate_fn=lambda server_round, new_arrays: out.write_round(new_arrays, strategy),
    )
    log(INFO, "Summary:\n%s\nRun directory: %s", summary(strategy, config), out.path)
    return out.path
