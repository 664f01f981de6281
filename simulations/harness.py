"""Shared pieces of the benchmark scripts: federations in process, central scoring, results.

Benchmarks are not tests: they take minutes, use the real data under
``../shared/datasets`` (or ``FEDGRAPHREC_DATA``), and write their results as
JSON and PNG into ``simulations/results/``. Every script prints the command
that reproduces it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation
from matplotlib.figure import Figure

from client.app import make_app
from client.train import site_graphs, site_model, train_locally
from common.config import RunConfig, default_config
from common.data import load_site
from common.data.dataset import Interactions
from common.data.site import SiteData
from common.ego_graphs import UserEgoGraphs
from common.evaluation import evaluate, evaluate_graph
from common.graph.release import ItemGraph, rating_settings
from common.model import EgoGraphRecommender, item_side_size
from common.privacy import site_mechanism
from common.text import item_text_vectors
from server.app import run

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "simulations" / "results"
DATA = Path(os.environ.get("FEDGRAPHREC_DATA", REPO.parent / "shared" / "datasets"))
MOVIELENS_IMPLICIT = {
    "implicit": True,
    "task": "ranking",
    "split": "random",
    "test_fraction": 0.2,
    "val_fraction": 0.1,
}
"""MovieLens-100K as implicit feedback: every rating one interaction, per user 20 % test
and 10 % validation (``data_config("ml-100k", **MOVIELENS_IMPLICIT)``)."""


def data_config(dataset: str, **changes: Any) -> RunConfig:
    """The app defaults for MovieLens-100K (``ml-100k``) or Gowalla (``gowalla``), with
    exact evaluation: a benchmark measures the model (its figures are this project's
    results, not a site's release); a deployment under DP releases noisy metric sums."""
    if dataset == "ml-100k":
        base = {"dataset": "ml-100k", "data_path": str(DATA / "ml-100k")}
    else:
        base = {"dataset": "lightgcn", "data_path": str(DATA / "gowalla"), "split": "canonical"}
    return default_config(**(base | {"evaluation": "exact"} | changes))


def federate(
    config: RunConfig,
    sites: int,
    cpus_per_site: float = 1.0,
    keep_models: bool = False,
    app: ClientApp | None = None,
) -> Path:
    """Run the federation in Flower's simulation engine; returns the run directory.

    Runs and site ledgers go to a fresh folder: each benchmark run starts with
    an empty privacy budget and leaves the user's own ledgers alone. With
    ``keep_models`` every round's global model stays as ``model-<round>.pt``
    (for choosing a round by validation without DP).
    """
    scratch = Path(tempfile.mkdtemp(prefix="fedgraphrec-bench-"))
    config = config.replace(run_dir=str(scratch / "runs"), site_state_dir=str(scratch / "sites"))
    out: list[Path] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        out.append(run(grid, config, context, keep_models=keep_models))

    run_simulation(
        server_app=server_app,
        client_app=app or make_app(),
        num_supernodes=sites,
        backend_config={"client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0}},
    )
    return out[0]


def secure_sum_equivalent(config: RunConfig, epsilon: float, steps: int) -> dict[str, Any]:
    """What secure aggregation computes, without the federation: ``steps`` DP-SGD steps,
    each one Poisson batch over every user at ``sample-rate``, with the sigma that
    ``target-epsilon = epsilon`` plans for ``steps`` rounds, and one Adam state for the
    whole run (as the server keeps). Returns the final model's test metrics and sigma."""
    planned = config.replace(
        target_epsilon=epsilon, secure_aggregation=True, num_server_rounds=steps
    )
    site = load_site(config, 0, 1)
    sigma = site_mechanism(planned, item_side_size(site.catalogue, planned)).noise_multiplier
    central = config.replace(
        noise_multiplier=sigma,
        target_epsilon=None,
        local_epochs=steps // config.steps_per_epoch,
    )
    torch.manual_seed(config.seed)
    model = site_model(site.catalogue, central)
    train_central(model, site_graphs(site, central), central, 1)
    return {"test": score(central, model.state_dict()), "sigma": sigma, "steps": steps}


def train_central(
    model: EgoGraphRecommender, graphs: UserEgoGraphs, config: RunConfig, epoch: int
) -> None:
    """One round of :func:`client.train.train_locally` over every user of ``graphs`` with
    the mechanism ``config`` gives a site (centralized baselines of the benchmarks)."""
    mechanism = site_mechanism(config, model.size)
    train_locally(model, graphs, config, mechanism=mechanism, server_round=epoch, device="cpu")


def score(
    config: RunConfig,
    state_dict: dict[str, torch.Tensor],
    part: str = "test",
    graph: ItemGraph | None = None,
) -> dict[str, float]:
    """Metrics of a global model over every user at once: all ``test`` (or ``val``)
    interactions, as a centralized evaluation would count them; ``graph`` is the released
    item graph the model learned on (``item-graph = "filter+gcn"``)."""
    everyone = load_site(config, 0, 1)
    model = site_model(everyone.catalogue, config, graph=graph)
    model.load_state_dict(state_dict)
    graphs = site_graphs(everyone, config, graph)
    if part == "val":
        return evaluate(model, graphs, everyone.val, config.top_k).metrics()
    return evaluate(model, graphs, everyone.test, config.top_k, exclude=everyone.val).metrics()


def kept_metrics(
    config: RunConfig,
    run_dir: Path,
    site: SiteData,
    heldout: Interactions,
    top_k: int,
    exclude: Interactions | None = None,
    last_round: bool = False,
) -> dict[str, float]:
    """Metrics on ``heldout`` (``site``'s users) of what a run kept: the graph it released,
    or the model it learned on it (``filter+gcn``: the run's best validation round where it
    kept one, else, or with ``last_round``, its last round)."""
    graph = ItemGraph.from_bytes((run_dir / "item_graph.npz").read_bytes())
    if config.item_graph != "filter+gcn":
        settings = rating_settings(config)
        text = item_text_vectors(site.catalogue, config)
        return evaluate_graph(
            graph, site, heldout, top_k, settings, exclude=exclude, text=text
        ).metrics()
    best = run_dir / "best-model.pt"
    model = site_model(site.catalogue, config, graph=graph)
    kept = best if best.exists() and not last_round else run_dir / "model.pt"
    model.load_state_dict(torch.load(kept))
    graphs = site_graphs(site, config, graph)
    return evaluate(model, graphs, heldout, top_k, exclude=exclude).metrics()


def best_round(run_dir: Path, config: RunConfig, metric: str) -> dict[str, Any]:
    """The kept model with the best validation ``metric`` (non-DP runs only: choosing
    by private validation data would spend budget), and its test metrics."""
    lower = metric in ("rmse", "mae")
    scored = []
    for path in run_dir.glob("model-*.pt"):
        state = torch.load(path)
        scored.append((score(config, state, "val")[metric], int(path.stem[6:]), state))
    value, server_round, state = (min if lower else max)(scored, key=lambda t: t[0])
    return {"round": server_round, f"val-{metric}": value, "test": score(config, state)}


def score_run(run_dir: Path, config: RunConfig) -> dict[str, Any]:
    """Central test metrics of a run's final model, its epsilons and its round times."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ledger = json.loads((run_dir / "ledger.json").read_text())
    finished = [
        m["finished_at"]
        for _, m in sorted(metrics.items(), key=lambda kv: int(kv[0]))
        if m.get("finished_at")
    ]
    last = [entries[-1] for entries in ledger["sites"].values()]
    return {
        "test": score(config, torch.load(run_dir / "model.pt")),
        "epsilon": max((e["epsilon"] for e in last), default=None),
        "single-message-epsilon": max(
            (e.get("single-message-epsilon", 0) for e in last), default=None
        ),
        "seconds-per-round": (finished[-1] - finished[0]) / (len(finished) - 1)
        if len(finished) > 1
        else None,
        "run-dir": str(run_dir),
    }


def write_results(name: str, results: dict[str, Any], figure: Figure | None = None) -> Path:
    """``simulations/results/<name>.json`` (and ``.png``)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {"generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())} | results
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(results, indent=2))
    if figure is not None:
        figure.tight_layout()
        figure.savefig(RESULTS / f"{name}.png", dpi=110)
    return path


class TreeMemory:
    """Peak resident memory of this process and all its descendants, in MB; and, sampled
    with it every 0.5 s, this process's own CPU time (all its threads)."""

    def __enter__(self) -> TreeMemory:
        self.peak, self.running = 0, True
        self.cpu: list[tuple[float, float]] = []  # (wall-clock time, CPU seconds)
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        root = psutil.Process()
        while self.running:
            total = 0
            for process in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += process.memory_info().rss
            self.peak = max(self.peak, total)
            times = root.cpu_times()
            self.cpu.append((time.time(), times.user + times.system))
            time.sleep(0.5)

    def cpu_seconds_at(self, moment: float) -> float:
        """This process's CPU seconds by wall-clock ``moment`` (interpolated)."""
        when, seconds = np.array(self.cpu).T
        return float(np.interp(moment, when, seconds))

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.megabytes = self.peak / 2**20
