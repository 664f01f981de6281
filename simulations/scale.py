"""Scale: 10, 100 and 1,000 simulated sites on this machine's two cores.

The built-in synthetic data with 6,000 users (600, 60 or 6 per site on average; the
first seed that leaves no site empty), the GCN with DP on, 3 rounds, every site
training and evaluating every round, ``--cpus-per-site`` CPUs per simulated site
(1: two sites at a time, each on one torch thread, as Ray sets
``OMP_NUM_THREADS`` to a site's CPUs). Measured, per round (rounds 2 and 3):
wall time; the sum of the sites' compute (a client mod times every call); the
CPU time of the simulation process itself (Flower's engine, the SuperLink state
and the ServerApp; sampled every 0.5 s), as a share of the round; Flower's
overhead, the share of the sites' CPU slots (cores / CPUs per site) not spent in
a site's call; peak resident memory of the whole process tree (the
simulation, Ray and its workers).

    python -m simulations.scale [--sites 10 100 1000] [--cpus-per-site 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.clientapp import ClientApp
from matplotlib.figure import Figure

from client.app import make_app
from client.secure_aggregation import secure_aggregation_mod
from common.config import RunConfig, default_config
from common.data import load_dataset, partition_sites
from common.errors import InputError
from common.protocol import CONFIG, SERVER_ROUND
from simulations.harness import TreeMemory, federate, write_results

USERS, ROUNDS, CORES = 6000, 3, 2


def timed_client_app(log: Path) -> ClientApp:
    """The site app with a mod that appends ``round kind seconds torch-threads`` of every
    call to ``log`` (kind: ``train`` or ``evaluate``)."""

    def timing(msg, context, call_next):
        start = time.perf_counter()
        reply = call_next(msg, context)
        server_round = msg.content.config_records[CONFIG][SERVER_ROUND]
        with open(log, "a") as f:
            seconds = time.perf_counter() - start
            kind = msg.metadata.message_type
            f.write(f"{server_round} {kind} {seconds} {torch.get_num_threads()}\n")
        return reply

    return make_app([timing, secure_aggregation_mod])


def first_seed_without_empty_sites(config: RunConfig, sites: int) -> RunConfig:
    """``config`` with the first seed whose IID partition leaves no site empty: every
    user's site is drawn from the user's own key, so at 6 users per site about one site
    in 400 gets none (``common.data.partition``)."""
    for seed in range(100):
        candidate = config.replace(seed=seed)
        with contextlib.suppress(InputError):
            partition_sites(load_dataset(candidate), candidate, sites)
            return candidate
    raise InputError(f"no seed below 100 leaves none of {sites} sites empty")


def measure(sites: int, cpus_per_site: int) -> dict[str, float]:
    log = Path(tempfile.mkdtemp()) / "calls.txt"
    config = default_config(
        item_graph="none", synthetic_users=USERS, num_server_rounds=ROUNDS, min_sites=sites
    )
    config = first_seed_without_empty_sites(config, sites)
    with TreeMemory() as memory:
        run_dir = federate(config, sites, cpus_per_site=cpus_per_site, app=timed_client_app(log))
    rounds = json.loads((run_dir / "metrics.json").read_text())
    finished = {int(r): m["finished_at"] for r, m in rounds.items() if m.get("finished_at")}
    measured = range(2, ROUNDS + 1)
    compute: dict[int, float] = {}
    calls: dict[str, list[float]] = {"train": [], "evaluate": []}
    threads = set()
    for line in log.read_text().split("\n"):
        if line:
            server_round, kind, seconds, torch_threads = line.split()
            compute[int(server_round)] = compute.get(int(server_round), 0.0) + float(seconds)
            threads.add(int(torch_threads))
            if int(server_round) in measured:
                calls[kind].append(float(seconds))
    walls = {r: finished[r] - finished[r - 1] for r in measured}
    slots = CORES // cpus_per_site
    overhead = [1 - compute[r] / (slots * walls[r]) for r in measured]
    cpu = {r: memory.cpu_seconds_at(finished[r]) for r in [measured[0] - 1, *measured]}
    engine_share = [(cpu[r] - cpu[r - 1]) / walls[r] for r in measured]
    return {
        "sites": sites,
        "users-per-site": USERS // sites,
        "cpus-per-site": cpus_per_site,
        "torch-threads-per-site": sorted(threads),
        "seed": config.seed,
        "seconds-per-round": sum(walls.values()) / len(walls),
        "site-compute-seconds-per-round": sum(compute[r] for r in measured) / len(walls),
        **{f"milliseconds-per-{k}-call": 1000 * float(np.mean(v)) for k, v in calls.items()},
        "simulation-process-cpu-share": sum(engine_share) / len(engine_share),
        "flower-overhead-share": sum(overhead) / len(overhead),
        "peak-memory-mb": memory.megabytes,
    }


def figure_of(results: list[dict]) -> Figure:
    """Round wall time and sites' compute (log scale) and Flower's overhead against sites."""
    figure = Figure(figsize=(6, 3.5))
    left = figure.subplots()
    counts = [r["sites"] for r in results]
    left.plot(counts, [r["seconds-per-round"] for r in results], "o-", label="s per round")
    left.plot(
        counts,
        [r["site-compute-seconds-per-round"] for r in results],
        "s--",
        label="sites' compute per round",
    )
    left.axhline(180, color="C0", linewidth=0.8, label="target at 1,000 sites: 3 min")
    left.set(
        xscale="log", yscale="log", xlabel="sites", ylabel="seconds", title="Simulation at scale"
    )
    right = left.twinx()
    right.plot(
        counts,
        [r["flower-overhead-share"] * 100 for r in results],
        "^:",
        color="C3",
        label="overhead %",
    )
    right.axhline(20, color="C3", linewidth=0.8, label="target at 10 sites: < 20 %")
    right.set(ylabel="Flower overhead, % of the sites' CPU slots", ylim=(0, 100))
    left.legend(loc="upper left", fontsize=7)
    right.legend(loc="lower right", fontsize=7)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--cpus-per-site", type=int, choices=(1, 2), default=1)
    args = parser.parse_args()
    results = []
    for sites in args.sites:
        results.append(measure(sites, args.cpus_per_site))
        print(results[-1], flush=True)
    print(
        write_results(
            "scale", {"rounds": ROUNDS, "users": USERS, "runs": results}, figure_of(results)
        )
    )


if __name__ == "__main__":
    main()
