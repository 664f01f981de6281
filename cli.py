"""The ``fedgraphrec`` command.

- ``fedgraphrec check-data -c 'dataset="ml-100k" data-path="/data/ml-100k"' --sites 10``
  loads a dataset exactly as a run would (same ``-c`` keys and syntax as
  ``flwr run``), reports what it found, and shows how the users would be split
  into sites.
- ``fedgraphrec report RUN_DIR`` re-renders a run's privacy report from its
  ledger and metrics.
- ``fedgraphrec audit RUN_DIR --sites N`` runs the one-run canary audit of one
  site under the run's configuration and adds the empirical lower bound to the
  report.

Bad input ends with a message naming the file, line, field or key, and exit
status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np
from flwr.common.config import parse_config_args

from client.audit import audit_site
from common.config import RunConfig, app_defaults
from common.data import load_dataset, split_dataset
from common.data.partition import partition_users
from common.errors import InputError
from common.files import write_json
from server.report import summary, write_report


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``-c 'k=1 s="x"'`` pairs (or one TOML file), parsed as ``flwr run --run-config`` does."""
    try:
        return parse_config_args(pairs)
    except (click.ClickException, ValueError) as error:
        message = error.message if isinstance(error, click.ClickException) else str(error)
        raise InputError(f"--run-config {pairs}: {message}") from None


def check_data(config: RunConfig, sites: int) -> str:
    dataset = load_dataset(config)
    split = split_dataset(dataset, config)
    catalogue = dataset.catalogue
    degree = np.bincount(dataset.interactions.user, minlength=dataset.num_users)
    site_of_user = partition_users(
        dataset,
        sites,
        config.partition,
        config.seed,
        config.partition_column,
        config.dirichlet_alpha,
    )
    lines = [
        f"dataset       {dataset.name}",
        f"users         {dataset.num_users}",
        f"items         {catalogue.num_items} ({'with' if catalogue.item_text else 'no'} text)",
        f"interactions  {len(dataset.interactions)}",
        f"ratings       {'implicit' if catalogue.implicit else catalogue.rating_levels}",
        f"per user      min {degree.min()}, median {int(np.median(degree))}, max {degree.max()}"
        f" (degree-cap {config.degree_cap}: {np.mean(degree > config.degree_cap):.1%} above)",
        f"user features {len(catalogue.user_feature_names)}",
        f"user columns  {sorted(dataset.user_columns)}",
        f"split         {config.split}: train {len(split.train)}, val {len(split.val)}, "
        f"test {len(split.test)}",
        f"sites         {config.partition}: users per site {np.bincount(site_of_user).tolist()}",
    ]
    return "\n".join(lines)


def run_directory(path: str) -> Path:
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file() or not (folder / "ledger.json").is_file():
        raise InputError(f"{folder}: not a run directory (expected config.json and ledger.json)")
    return folder


def report(folder: Path) -> str:
    return summary(write_report(folder)) + f"\nWrote {folder}/privacy_report.{{json,md,html}}"


def audit(folder: Path, sites: int, site: int, canaries: int, guesses: int, seed: int) -> str:
    config = RunConfig.from_mapping(json.loads((folder / "config.json").read_text()))
    result = audit_site(config, sites, site, canaries, guesses, seed)
    write_json(folder / "audit.json", result)
    accountant = result["accountant-epsilon"]
    bound = "none, dp = false" if accountant is None else f"{accountant:.3f}"
    return (
        f"{result['correct']} of {result['guesses']} guesses correct with {canaries} canaries: "
        f"empirical epsilon >= {result['epsilon-lower-bound']:.3f} at {1 - result['p-value']:.0%} "
        f"confidence (accountant: {bound})\n" + report(folder)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedgraphrec", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-data", help="load a dataset as a run would and report")
    check.add_argument(
        "-c",
        "--run-config",
        action="append",
        default=[],
        help="overrides of [tool.flwr.app.config], e.g. 'dataset=\"ml-100k\"'",
    )
    check.add_argument("--sites", type=int, default=3, help="number of sites to preview")
    render = commands.add_parser("report", help="re-render a run's privacy report")
    render.add_argument("run_dir")
    audit_parser = commands.add_parser("audit", help="one-run canary audit of one site")
    audit_parser.add_argument("run_dir")
    audit_parser.add_argument("--sites", type=int, required=True, help="sites in the run")
    audit_parser.add_argument("--site", type=int, default=0, help="the site to audit")
    audit_parser.add_argument("--canaries", type=int, default=500)
    audit_parser.add_argument("--guesses", type=int, default=100, help="guesses each way")
    audit_parser.add_argument("--seed", type=int, default=0, help="seed of canary inclusion")
    args = parser.parse_args(argv)
    try:
        if args.command == "check-data":
            config = RunConfig.from_mapping(app_defaults() | parse_overrides(args.run_config))
            print(check_data(config, args.sites))
        elif args.command == "report":
            print(report(run_directory(args.run_dir)))
        else:
            folder = run_directory(args.run_dir)
            print(audit(folder, args.sites, args.site, args.canaries, args.guesses, args.seed))
    except InputError as error:
        print(f"fedgraphrec: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
