"""The ``fedgraphrec`` command.

``fedgraphrec check-data -c 'dataset="ml-100k" data-path="/data/ml-100k"' --sites 10``
loads a dataset exactly as a run would (same ``-c`` keys and syntax as
``flwr run``), reports what it found, and shows how the users would be split
into sites. Bad input ends with the loader's message (file, line, field) and
exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from typing import Any

import numpy as np

from common.config import RunConfig, app_defaults
from common.data import load_dataset, split_dataset
from common.data.partition import partition_users
from common.errors import InputError


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["k=1 s='x'", ...]`` in TOML syntax, as ``flwr run --run-config`` takes them."""
    values: dict[str, Any] = {}
    for text in pairs:
        try:
            values |= tomllib.loads(text.replace(" ", "\n"))
        except tomllib.TOMLDecodeError as error:
            raise InputError(f"--run-config {text!r}: not TOML key=value pairs ({error})") from None
    return values


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
    args = parser.parse_args(argv)
    try:
        config = RunConfig.from_mapping(app_defaults() | parse_overrides(args.run_config))
        print(check_data(config, args.sites))
    except InputError as error:
        print(f"fedgraphrec: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
