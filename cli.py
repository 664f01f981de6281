"""The ``fedgraphrec`` command: prepare data and keys for fedgraphrec runs, and report on them.

fedgraphrec trains a graph recommender across sites with user-level
differential privacy (runs start with ``flwr run``); this command does the work
around a run:

- ``fedgraphrec run [APP_DIR] [flwr run's options]`` submits a run through
  ``flwr run --stream`` and streams its log, after checking every
  ``--run-config`` key; it exits 0 only when the run completed, and otherwise
  ends with the one-line reason (``flwr run`` exits 0 whatever happened).
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
- ``fedgraphrec recommend RUN_DIR --data --user 196 -k 10`` prints a user's top
  items from the recommender a completed run saved (``--site SITE_DIR`` for a
  deployed site's users; ``--format json`` for scripts).
- ``fedgraphrec serve RUN_DIR --data`` (or ``--site SITE_DIR``) answers the same
  over HTTP for one site (``client.serve``), on 127.0.0.1:8000 unless told otherwise.
- ``fedgraphrec audit RUN_DIR`` runs the one-run canary audit of the run's
  mechanism (on synthetic users: no site's data, no budget) and adds the
  empirical lower bound to the report.

Bad input ends with a message naming the file, line, field or key, and exit
status 2. Heavy libraries (numpy, torch, Flower, Opacus, cryptography) are
imported inside the commands that use them, so ``--help`` and argument errors
answer at once.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.config import RunConfig, app_defaults
from common.errors import InputError

DESCRIPTION = (
    "Prepare data folders, TLS certificates and site keys for fedgraphrec, a federated graph "
    "recommender with user-level differential privacy, report on its runs, and serve a "
    "completed run's recommendations (a run itself starts with `flwr run`)."
)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``-c 'k=1 s="x"'`` pairs (or one TOML file), parsed as ``flwr run --run-config`` does."""
    import click
    from flwr.common.config import parse_config_args

    try:
        return parse_config_args(pairs)
    except (click.ClickException, ValueError) as error:
        message = error.message if isinstance(error, click.ClickException) else str(error)
        raise InputError(f"--run-config {pairs}: {message}") from None


def check_data(config: RunConfig, sites: int) -> str:
    """What a run would load: sizes, rating scale, degrees, split and users per site, and
    what of the catalogue was taken from the data rather than given."""
    import numpy as np

    from common.data import load_dataset, partition_sites, split_dataset

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
    if catalogue.derived_from_data:
        lines.append(
            f"derived       {', '.join(catalogue.derived_from_data)} taken from the data, not "
            "public (dp = false only; see the README's Data section)"
        )
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
    """Write one data folder per site and the coordinator's catalogue into ``out``."""
    from common.data import load_dataset, partition_sites, split_dataset
    from common.data.site_folder import write_site_folders

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


def certificates(out: Path, hosts: list[str], sites: int, days: int) -> str:
    """Write the CA, the SuperLink's certificate and the sites' keys; list the files."""
    from common.certificates import write_certificates

    return "\n".join(map(str, write_certificates(out, hosts, sites, days)))


def run_directory(path: str) -> Path:
    """``path`` as a folder, checked to hold a run's config.json and ledger.json."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file() or not (folder / "ledger.json").is_file():
        raise InputError(f"{folder}: not a run directory (expected config.json and ledger.json)")
    return folder


def report(folder: Path) -> str:
    """Re-render the run's privacy report; its summary and where the files went."""
    from server.report import write_report
    from server.report_render import summary

    return summary(write_report(folder)) + f"\nWrote {folder}/privacy_report.{{json,md,html}}"


def audit(folder: Path, canaries: int, guesses: int, users: int, seed: int) -> str:
    """Run the canary audit of the run's mechanism, record it in ``audit.json`` and the
    report."""
    from client.audit import audit_mechanism
    from common.data import load_dataset
    from common.data.site_folder import load_catalogue_folder
    from common.files import write_json

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


def site_recommender(args: argparse.Namespace) -> tuple[Any, Any]:
    """The run's saved recommender and the site's users (``--site`` or ``--data``)."""
    from client.recommender import load_recommender, site_users

    recommender = load_recommender(args.run_dir)
    return recommender, site_users(recommender, args.site)


def recommend(args: argparse.Namespace) -> str:
    """A site user's top ``-k`` items, as a table or as JSON."""
    from client.recommender import ranked

    recommender, users = site_recommender(args)
    rows = ranked(recommender.recommend(users.user(args.user), args.k, not args.include_seen))
    if args.format == "json":
        return json.dumps({"user": args.user, "items": rows}, indent=2)
    score = "predicted rating" if recommender.config.task == "rating" else "score"
    width = max([4] + [len(r["item"]) for r in rows])
    lines = [f"{'rank':>4}  {'item':<{width}}  {score:>16}  title"]
    for r in rows:
        title = (r["text"] or "").split(". Genres:")[0][:60]
        lines.append(f"{r['rank']:>4}  {r['item']:<{width}}  {r['score']:>16.3f}  {title}")
    return "\n".join(lines)


def serve(args: argparse.Namespace) -> None:
    """Serve the site's recommendations over HTTP until stopped."""
    import torch
    import uvicorn

    from client.serve import make_app

    torch.set_num_threads(1)  # many small requests in parallel threads, not one wide one
    recommender, users = site_recommender(args)
    app = make_app(recommender, users, Path(args.run_dir).expanduser())
    print(
        f"Serving {users.site.num_users} users, {recommender.catalogue.num_items} items on "
        f"http://{args.host}:{args.port} (stop with Ctrl-C)",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


RUN_DIRECTORY = re.compile(r"Run directory: (\S+)")
RUN_FAILED = re.compile(r"Run failed: (.*)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def submit(app_dir: str, options: list[str]) -> int:
    """``flwr run APP_DIR --stream OPTIONS``, its log streamed; 0 only when the run
    completed (``status.json``), else 1 and a last line that says why."""
    import subprocess

    app = Path(app_dir).expanduser()
    if not (app / "pyproject.toml").is_file():
        raise InputError(f"{app}: not a Flower App (no pyproject.toml)")
    overrides = [
        value for flag, value in itertools.pairwise(options) if flag in ("--run-config", "-c")
    ]
    overrides += [o.split("=", 1)[1] for o in options if o.startswith("--run-config=")]
    RunConfig.from_mapping(app_defaults(app / "pyproject.toml") | parse_overrides(overrides))
    flwr = Path(sys.executable).with_name("flwr")
    environment = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"} | dict(os.environ)
    command = [str(flwr), "run", str(app), "--stream", *options]
    run_dir, failed = None, None
    with subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        for line in process.stdout:
            print(line, end="", flush=True)
            plain = ANSI.sub("", line)
            if run_dir is None and (found := RUN_DIRECTORY.search(plain)):
                run_dir = Path(found.group(1))
            if found := RUN_FAILED.search(plain):
                failed = found.group(1).strip()
    status = {}
    if run_dir is not None and (run_dir / "status.json").is_file():
        status = json.loads((run_dir / "status.json").read_text())
    if status.get("status") == "completed":
        return 0
    reason = status.get("reason") or failed
    if reason is None:
        reason = f"flwr run exited with status {process.returncode} and no run directory"
        if status:
            reason = f"the run is {status.get('status')}"
    print(f"fedgraphrec: run failed: {reason}", file=sys.stderr)
    return 1


def count(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per task, every option described."""
    parser = argparse.ArgumentParser(prog="fedgraphrec", description=DESCRIPTION)
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", title="commands"
    )

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=summary)

    submitted = command(
        "run", "submit a run through `flwr run --stream`; exit 0 only if it completed"
    )
    submitted.usage = "fedgraphrec run [APP_DIR] [flwr run's options, e.g. --run-config '...']"
    check = command("check-data", "load a dataset as a run would and report what it found")
    split = command("partition", "split a dataset into one data folder per site for deployment")
    for sub in (check, split):
        sub.add_argument("--dataset", help="the dataset key: synthetic, ml-100k, csv ...")
        sub.add_argument("--data-path", help="the data-path key: where the dataset's files are")
        sub.add_argument(
            "-c",
            "--run-config",
            action="append",
            default=[],
            help="other keys of [tool.flwr.app.config], e.g. 'split=\"u1\" seed=3'",
        )
    check.add_argument(
        "--sites", type=count(1), default=3, help="number of sites to preview (default 3)"
    )
    split.add_argument("--sites", type=count(1), required=True, help="number of sites")
    split.add_argument("--out", required=True, help="a new folder for the site folders")
    certs = command("certs", "make TLS certificates for the SuperLink and keys for the sites")
    certs.add_argument("--out", required=True, help="folder for the files")
    certs.add_argument("--hosts", nargs="+", required=True, help="SuperLink names and IPs")
    certs.add_argument("--sites", type=count(1), required=True, help="one key pair per site")
    certs.add_argument(
        "--days", type=count(1), default=365, help="certificate validity in days (default 365)"
    )
    render = command("report", "re-render a run's privacy report from its ledger and metrics")
    render.add_argument("run_dir", help="the run's directory (holds config.json, ledger.json)")
    check_run = command(
        "audit", "run the one-run canary audit of a run's mechanism (synthetic users, no budget)"
    )
    check_run.add_argument("run_dir", help="the run's directory (holds config.json, ledger.json)")
    check_run.add_argument(
        "--canaries", type=count(1), default=4000, help="gradient canaries (default 4000)"
    )
    check_run.add_argument(
        "--guesses", type=count(1), default=1000, help="guesses each way (default 1000)"
    )
    check_run.add_argument(
        "--users", type=count(1), default=200, help="synthetic users beside them (default 200)"
    )
    check_run.add_argument(
        "--seed", type=count(0), default=0, help="seed of canary inclusion (default 0)"
    )
    answer = command("recommend", "print a user's top items from a completed run")
    service = command("serve", "serve a site's recommendations over HTTP from a completed run")
    for sub in (answer, service):
        sub.add_argument("run_dir", help="the completed run's directory (holds recommender.json)")
        users = sub.add_mutually_exclusive_group(required=True)
        users.add_argument("--site", help="a deployed site's data folder: its users")
        users.add_argument(
            "--data",
            action="store_true",
            help="the users of the data the run's configuration names (a simulation)",
        )
    answer.add_argument("--user", required=True, help="the user's id as the data has it")
    answer.add_argument("-k", type=count(1), default=10, help="how many items (default 10)")
    answer.add_argument(
        "--include-seen", action="store_true", help="keep the items the user already has"
    )
    answer.add_argument(
        "--format", choices=("table", "json"), default="table", help="output (default table)"
    )
    service.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    service.add_argument("--port", type=count(1), default=8000, help="port (default 8000)")
    return parser


def run(args: argparse.Namespace) -> str:
    """The output of the subcommand that ``args`` names."""
    if args.command == "check-data":
        return check_data(load_config(args), args.sites)
    if args.command == "partition":
        return partition(load_config(args), args.sites, Path(args.out).expanduser())
    if args.command == "certs":
        return certificates(Path(args.out).expanduser(), args.hosts, args.sites, args.days)
    if args.command == "report":
        return report(run_directory(args.run_dir))
    if args.command == "recommend":
        return recommend(args)
    if args.command == "serve":
        serve(args)
        return ""
    folder = run_directory(args.run_dir)
    return audit(folder, args.canaries, args.guesses, args.users, args.seed)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if args.command == "run":  # APP_DIR, then flwr run's own options, unparsed
            app = unknown.pop(0) if unknown and not unknown[0].startswith("-") else "."
            return submit(app, unknown)
        output = run(args)
        if output:
            print(output, flush=True)
    except InputError as error:
        print(f"fedgraphrec: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped early (``| head``): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush at exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
