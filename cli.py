"""The ``fedgraphrec`` command.

- ``fedgraphrec check-data -c 'dataset="ml-100k" data-path="/data/ml-100k"' --sites 10``
  loads a dataset exactly as a run would (same ``-c`` keys and syntax as
  ``flwr run``), reports what it found, and shows how the users would be split
  into sites.
- ``fedgraphrec partition --dataset ml-100k --data-path /data/ml-100k --sites 3 --out DIR``
  writes one data folder per site (its users' interactions, the public
  catalogue, a manifest with counts and checksums) and ``DIR/catalogue`` for
  the coordinator.
- ``fedgraphrec certs --out DIR --hosts 127.0.0.1 localhost --sites 3`` makes
  a CA, the SuperLink's TLS certificate and one SuperNode key pair per site.
- ``fedgraphrec report RUN_DIR`` re-renders a run's privacy report from its
  ledger and metrics.
- ``fedgraphrec audit RUN_DIR`` runs the one-run canary audit of the run's
  mechanism (on synthetic users: no site's data, no budget) and adds the
  empirical lower bound to the report.

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

from client.audit import audit_mechanism
from common.certificates import write_certificates
from common.config import RunConfig, app_defaults
from common.data import load_dataset, partition_sites, split_dataset
from common.data.site_folder import load_catalogue_folder, write_site_folders
from common.errors import InputError
from common.files import write_json
from server.report import write_report
from server.report_render import summary


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
    site_of_user = partition_sites(dataset, config, sites)
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


def load_config(args: argparse.Namespace) -> RunConfig:
    """The app defaults, then ``--dataset``/``--data-path``, then ``-c`` overrides."""
    named = {
        key: value
        for key, value in (("dataset", args.dataset), ("data-path", args.data_path))
        if value is not None
    }
    return RunConfig.from_mapping(app_defaults() | named | parse_overrides(args.run_config))


def partition(config: RunConfig, sites: int, out: Path) -> str:
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out: {out} is not empty; choose a new folder")
    dataset = load_dataset(config)
    site_of_user = partition_sites(dataset, config, sites)
    folders = write_site_folders(dataset, split_dataset(dataset, config), site_of_user, out)
    lines = [f"{out / 'catalogue'}: the public catalogue (catalogue-path for the server)"]
    for folder in folders:
        manifest = json.loads((folder / "manifest.json").read_text())
        lines.append(f"{folder}: {manifest['users']} users, {manifest['interactions']}")
    return "\n".join(lines)


def run_directory(path: str) -> Path:
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file() or not (folder / "ledger.json").is_file():
        raise InputError(f"{folder}: not a run directory (expected config.json and ledger.json)")
    return folder


def report(folder: Path) -> str:
    return summary(write_report(folder)) + f"\nWrote {folder}/privacy_report.{{json,md,html}}"


def audit(folder: Path, canaries: int, guesses: int, users: int, seed: int) -> str:
    config = RunConfig.from_mapping(json.loads((folder / "config.json").read_text()))
    catalogue = (
        load_catalogue_folder(config.catalogue_path)
        if config.catalogue_path
        else load_dataset(config).catalogue
    )
    result = audit_mechanism(config, catalogue, canaries, guesses, seed, users)
    write_json(folder / "audit.json", result)
    accountant = result["accountant-epsilon"]
    bound = "none, dp = false" if accountant is None else f"{accountant:.3f}"
    lines = [
        f"{result['correct']} of {result['guesses']} guesses correct with {canaries} canaries: "
        f"empirical epsilon >= {result['epsilon-lower-bound']:.3f} at {1 - result['p-value']:.0%} "
        f"confidence (accountant: {bound}; the most these guesses can show: "
        f"{result['epsilon-ceiling']:.3f})"
    ]
    if result["ceiling-below-claim"]:
        lines.append(
            f"WARNING: with {result['guesses']} guesses the audit cannot show more than "
            f"{result['epsilon-ceiling']:.3f}, below the claimed {accountant:.3f}: it could not "
            "refute the claim whatever happened; use more --canaries and --guesses"
        )
    return "\n".join(lines) + "\n" + report(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedgraphrec", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-data", help="load a dataset as a run would and report")
    split = commands.add_parser("partition", help="write one data folder per site")
    for command in (check, split):
        command.add_argument("--dataset", help="the dataset key (see the README)")
        command.add_argument("--data-path", help="the data-path key")
        command.add_argument(
            "-c",
            "--run-config",
            action="append",
            default=[],
            help="other keys of [tool.flwr.app.config], e.g. 'split=\"u1\" seed=3'",
        )
    check.add_argument("--sites", type=int, default=3, help="number of sites to preview")
    split.add_argument("--sites", type=int, required=True, help="number of sites")
    split.add_argument("--out", required=True, help="a new folder for the site folders")
    certs = commands.add_parser("certs", help="TLS certificates and SuperNode keys")
    certs.add_argument("--out", required=True, help="folder for the files")
    certs.add_argument("--hosts", nargs="+", required=True, help="SuperLink names and IPs")
    certs.add_argument("--sites", type=int, required=True, help="one key pair per site")
    certs.add_argument("--days", type=int, default=365, help="certificate validity")
    render = commands.add_parser("report", help="re-render a run's privacy report")
    render.add_argument("run_dir")
    audit_parser = commands.add_parser("audit", help="one-run canary audit of the mechanism")
    audit_parser.add_argument("run_dir")
    audit_parser.add_argument("--canaries", type=int, default=4000, help="gradient canaries")
    audit_parser.add_argument("--guesses", type=int, default=1000, help="guesses each way")
    audit_parser.add_argument("--users", type=int, default=200, help="synthetic users")
    audit_parser.add_argument("--seed", type=int, default=0, help="seed of canary inclusion")
    args = parser.parse_args(argv)
    try:
        if args.command == "check-data":
            print(check_data(load_config(args), args.sites))
        elif args.command == "partition":
            print(partition(load_config(args), args.sites, Path(args.out).expanduser()))
        elif args.command == "certs":
            out = Path(args.out).expanduser()
            for path in write_certificates(out, args.hosts, args.sites, args.days):
                print(path)
        elif args.command == "report":
            print(report(run_directory(args.run_dir)))
        else:
            folder = run_directory(args.run_dir)
            print(audit(folder, args.canaries, args.guesses, args.users, args.seed))
    except InputError as error:
        print(f"fedgraphrec: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
