"""Scale: 10, 100 and 1,000 simulated sites on this machine's two cores.

The built-in synthetic data with 6,000 users (600, 60 or 6 per site on average; the
first seed that leaves no site empty), the GCN with DP on,
3 rounds, every site training and evaluating every round, one ClientApp at a
time (2 CPUs per site), so that client compute adds up to wall time. Measured:
wall time per round (rounds 2 and 3), peak resident memory of the whole
process tree (the simulation, Ray and its workers; sampled every 0.5 s), the
sum of the sites' compute (a client mod times every call), and Flower's
overhead: round wall time minus the sites' compute, as a share of the wall
time.

    python -m simulations.scale [--sites 10 100 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

from flwr.clientapp import ClientApp
from matplotlib.figure import Figure

from client.app import make_app
from client.secure_aggregation import secure_aggregation_mod
from common.config import RunConfig, default_config
from common.data import load_dataset, partition_sites
from common.errors import InputError
from common.protocol import CONFIG, SERVER_ROUND
from simulations.harness import TreeMemory, federate, write_results

USERS, ROUNDS = 6000, 3


def timed_client_app(log: Path) -> ClientApp:
    """The site app with a mod that appends ``round seconds`` of every call to ``log``."""

    def timing(msg, context, call_next):
        start = time.perf_counter()
        reply = call_next(msg, context)
        server_round = msg.content.config_records[CONFIG][SERVER_ROUND]
        with open(log, "a") as f:
            f.write(f"{server_round} {time.perf_counter() - start}\n")
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


def measure(sites: int) -> dict[str, float]:
    log = Path(tempfile.mkdtemp()) / "calls.txt"
    config = default_config(
        item_graph="none", synthetic_users=USERS, num_server_rounds=ROUNDS, min_sites=sites
    )
    config = first_seed_without_empty_sites(config, sites)
    with TreeMemory() as memory:
        run_dir = federate(config, sites, cpus_per_site=2.0, app=timed_client_app(log))
    rounds = json.loads((run_dir / "metrics.json").read_text())
    finished = {int(r): m["finished_at"] for r, m in rounds.items() if m.get("finished_at")}
    compute: dict[int, float] = {}
    for line in log.read_text().split("\n"):
        if line:
            server_round, seconds = line.split()
            compute[int(server_round)] = compute.get(int(server_round), 0.0) + float(seconds)
    walls = {r: finished[r] - finished[r - 1] for r in range(2, ROUNDS + 1)}
    overhead = [(walls[r] - compute[r]) / walls[r] for r in walls]
    return {
        "sites": sites,
        "users-per-site": USERS // sites,
        "seed": config.seed,
        "seconds-per-round": sum(walls.values()) / len(walls),
        "site-compute-seconds-per-round": sum(compute[r] for r in walls) / len(walls),
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
    right.set(ylabel="Flower overhead, % of round", ylim=(0, 25))
    left.legend(loc="upper left", fontsize=7)
    right.legend(loc="lower right", fontsize=7)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000])
    args = parser.parse_args()
    results = []
    for sites in args.sites:
        results.append(measure(sites))
        print(results[-1], flush=True)
    print(
        write_results(
            "scale", {"rounds": ROUNDS, "users": USERS, "runs": results}, figure_of(results)
        )
    )


if __name__ == "__main__":
    main()
