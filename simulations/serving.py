"""Serving speed: what a site's user calls, on saved runs of MovieLens-100K and Gowalla.

- Loading: ``load_recommender`` and the site's users (``site_users``), in a fresh
  process, wall time.
- In process: ``Recommender.recommend`` of one site user's top 10 over the full
  catalogue, their own items left out, 1,000 random users after 50 warm-up
  queries, one torch thread (as the service runs); p50 and p99.
- Over HTTP: ``fedgraphrec serve`` in its own process, 16 client threads each
  asking ``GET /users/{id}/recommendations?k=10`` of random users for 20 s
  after 2 s of warm-up; p50 and p99 latency and requests per second.

Both runs are the app's defaults without DP (the learned model on the item
graph, ``filter+gcn``), 10 sites; made here unless given:

    python -m simulations.serving [--ml-100k RUN_DIR] [--gowalla RUN_DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from matplotlib.figure import Figure

from client.recommender import load_recommender, site_users
from simulations.harness import REPO, data_config, federate, write_results

QUERIES, WARM_UP = 1000, 50
CLIENTS, SECONDS, WARM_UP_SECONDS = 16, 20.0, 2.0
SITES = 10


def saved_run(dataset: str) -> Path:
    """A run of the defaults without DP on ``dataset`` (10 sites)."""
    task = {"task": "ranking"} if dataset == "gowalla" else {}
    return federate(data_config(dataset, dp=False, min_sites=SITES, **task), SITES)


def loading_seconds(run_dir: Path) -> float:
    """Wall time of loading the recommender and the site's users in a fresh process."""
    code = (
        "import sys, time; start = time.perf_counter(); "
        "from client.recommender import load_recommender, site_users; "
        "r = load_recommender(sys.argv[1]); site_users(r); "
        "print(time.perf_counter() - start)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.split()[-1])


def in_process(run_dir: Path) -> dict[str, float]:
    recommender = load_recommender(run_dir)
    users = site_users(recommender)
    rng = np.random.default_rng(0)
    ids = user_ids(recommender)
    seconds = []
    for user in rng.choice(ids, QUERIES + WARM_UP):
        person = users.user(user)
        start = time.perf_counter()
        recommender.recommend(person, 10)
        seconds.append(time.perf_counter() - start)
    ms = np.array(seconds[WARM_UP:]) * 1000
    return {
        "items": recommender.catalogue.num_items,
        "p50-ms": float(np.percentile(ms, 50)),
        "p99-ms": float(np.percentile(ms, 99)),
        "queries": QUERIES,
    }


def user_ids(recommender) -> list[str]:
    """The original ids of the run's users (the data the run's configuration names)."""
    from common.data import load_dataset

    return list(load_dataset(recommender.config).user_ids)


def over_http(run_dir: Path, port: int = 8765) -> dict[str, float]:
    server = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", str(run_dir), "--data", "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        ids = user_ids(load_recommender(run_dir))
        latencies: list[float] = []
        start = time.perf_counter()
        measured_from, stop = start + WARM_UP_SECONDS, start + WARM_UP_SECONDS + SECONDS

        def client(seed: int) -> None:
            rng = np.random.default_rng(seed)
            with httpx.Client(base_url=base, timeout=30) as session:
                while (now := time.perf_counter()) < stop:
                    reply = session.get(f"/users/{rng.choice(ids)}/recommendations?k=10")
                    reply.raise_for_status()
                    if now >= measured_from:
                        latencies.append(time.perf_counter() - now)

        threads = [threading.Thread(target=client, args=(s,)) for s in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        server.terminate()
        server.wait(timeout=30)
    ms = np.array(latencies) * 1000
    return {
        "clients": CLIENTS,
        "p50-ms": float(np.percentile(ms, 50)),
        "p99-ms": float(np.percentile(ms, 99)),
        "requests-per-second": len(latencies) / SECONDS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ml-100k", type=Path, help="a saved run of MovieLens-100K")
    parser.add_argument("--gowalla", type=Path, help="a saved run of Gowalla")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as `fedgraphrec serve` does: one thread per request
    runs = {"ml-100k": args.ml_100k, "gowalla": args.gowalla}
    results = {}
    for dataset, run_dir in runs.items():
        run_dir = run_dir or saved_run(dataset)
        results[dataset] = {
            "run": str(run_dir),
            "load-seconds": loading_seconds(run_dir),
            "in-process": in_process(run_dir),
            "http": over_http(run_dir),
        }
        print(dataset, results[dataset], flush=True)
    figure = Figure(figsize=(8, 3.5))
    left, right = figure.subplots(1, 2)
    names = list(results)
    for offset, key in enumerate(("p50-ms", "p99-ms")):
        positions = [i + 0.35 * offset for i in range(len(names))]
        left.bar(positions, [r["in-process"][key] for r in results.values()], 0.35, label=key)
        right.bar(positions, [r["http"][key] for r in results.values()], 0.35, label=key)
    left.set(ylabel="milliseconds", title="recommend(), in process")
    right.set(title=f"HTTP, {CLIENTS} clients")
    for axes in (left, right):
        axes.set_xticks([0.175, 1.175], names)
        axes.legend()
    print(write_results("serving", results, figure))


if __name__ == "__main__":
    main()
