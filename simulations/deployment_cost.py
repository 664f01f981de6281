"""What a deployment message costs a site, stage by stage, and the simulated rounds.

The deployment test's MovieLens-100K run (``tests/test_deployment.py -k movielens``:
3 site folders, the default pipeline, ``item-text = false``, one server round)
gives the deployment's round times. This script gives the two figures to read
them against. First, the same configuration in Flower's simulation
(``harness.federate``, 3 sites): each round's seconds, round 0 counted from the
run's ``config.json``, as for the deployment. Second, what a message costs in
a fresh process. In deployment Flower 1.42 starts a new ClientApp process for every message, so
each one pays the interpreter's start and the app's imports before the site
does anything. For ``--repeats`` fresh processes per message kind this times,
as that process sees it: the interpreter's start and ``import client.app``
(what loading the ClientApp costs this app), opening the round (reading and
checking the site folder), building the model from the global state, and the
handler itself. The messages are the default pipeline's first ones on
MovieLens-100K over 3 site folders written by ``fedgraphrec partition`` (as
the deployment test writes them): round 0's evaluation and round 1's training
(the item graph's first statistics, with DP). What a deployment round costs
beyond these stages is Flower's: its own process start and imports,
installing the app bundle, and moving the messages.

This module imports only the standard library at the top, so that a child
process's imports are the app's alone.

    python -m simulations.deployment_cost [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SITES = 3
"""As in the deployment test and the README's walkthrough."""
STAGES = ("start and imports", "open the round", "build the model", "handler")
MESSAGES = {"round 0 evaluate": ("evaluate", 0), "round 1 train": ("train", 1)}


def child(folder: str, handler: str, server_round: int, spawned: float) -> None:
    """Run one message's stages in this fresh process; print their seconds as JSON."""
    from client.app import SiteRound

    imported = time.time()
    from common.config import default_config
    from common.data.site_folder import load_site_folder
    from common.model import build_model
    from common.protocol import instruction_values

    catalogue = load_site_folder(Path(folder)).catalogue  # the server's part: not timed
    config = default_config(dataset="ml-100k")
    state = build_model(catalogue, config).state_dict()
    values = instruction_values(config, "deployment-cost", catalogue.fingerprint(), server_round)
    marks = [time.time()]
    site_round = SiteRound.open({"data-path": folder}, values)
    marks.append(time.time())
    model = site_round.model(state)
    marks.append(time.time())
    getattr(site_round, handler)(model)
    marks.append(time.time())
    seconds = [imported - spawned, *(b - a for a, b in itertools.pairwise(marks))]
    print(json.dumps(dict(zip(STAGES, seconds, strict=True))))


def fresh_process(folder: Path, handler: str, server_round: int) -> dict[str, float]:
    """One message's stages, timed in a new interpreter."""
    code = (
        "import sys; from simulations.deployment_cost import child; "
        f"child({str(folder)!r}, {handler!r}, {server_round}, float(sys.argv[1]))"
    )
    command = [sys.executable, "-c", code, repr(time.time())]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the child process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def figure_of(results: dict[str, dict[str, float]]):
    """One stacked bar per message: its seconds by stage."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 2.5))
    axes = figure.subplots()
    left = [0.0] * len(results)
    for stage in STAGES:
        widths = [stages[stage] for stages in results.values()]
        axes.barh(list(results), widths, left=left, label=stage)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    axes.set(xlabel="seconds in a fresh process", title="One deployment message at a site")
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    return figure


def simulated_rounds() -> list[float]:
    """Seconds of each round of the deployment test's configuration in the simulation."""
    from simulations.harness import data_config, federate

    config = data_config("ml-100k", item_graph="filter", item_text=False, min_sites=SITES)
    run_dir = federate(config, SITES)
    rounds = json.loads((run_dir / "metrics.json").read_text())
    finished = [(run_dir / "config.json").stat().st_mtime]
    finished += [rounds[r]["finished_at"] for r in sorted(rounds, key=int)]
    return [b - a for a, b in itertools.pairwise(finished)]


def main() -> None:
    from cli import main as fedgraphrec
    from simulations.harness import DATA, write_results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    simulated = simulated_rounds()
    print("simulated rounds (s):", [round(s, 2) for s in simulated], flush=True)
    sites = Path(tempfile.mkdtemp()) / "sites"
    partition = ["--dataset", "ml-100k", "--data-path", str(DATA / "ml-100k")]
    if fedgraphrec(["partition", "--sites", str(SITES), "--out", str(sites), *partition]) != 0:
        raise SystemExit("partition failed")
    results = {}
    for name, (handler, server_round) in MESSAGES.items():
        runs = [fresh_process(sites / "site-0", handler, server_round) for _ in range(args.repeats)]
        results[name] = {stage: sum(r[stage] for r in runs) / len(runs) for stage in STAGES}
        print(name, results[name], flush=True)
    content = {"simulated-round-seconds": simulated, "repeats": args.repeats, "messages": results}
    print(write_results("deployment_cost", content, figure_of(results)))


if __name__ == "__main__":
    main()
