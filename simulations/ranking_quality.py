"""Ranking quality: PyG's LightGCN (the measured peer) against this model.

Recall@20 and NDCG@20 over the full catalogue, the user's training items left
out (LightGCN's definitions; PyG's ``LinkPredRecall``/``LinkPredNDCG``, the
same code for every method).

**MovieLens-100K as implicit feedback.** Every rating is one interaction
(``implicit = true``); per user, 20% of interactions (by seed) are test and
10% validation, the rest train. Everything trains to convergence: non-DP
methods stop by validation Recall@20 (LightGCN: evaluated every 10 epochs,
stopping after 5 evaluations without gain, at most 400 epochs; ours: at most
60 epochs centrally, 30 rounds federated) and report test at the best
validation point. DP runs (epsilon 1, 2, 4, 8, delta 1e-5 per site, 50 steps
at sampling rate 0.5) report their last round: secure aggregation off through
Flower with 10 sites, and on as the mechanism the secure sum computes
(centralized DP-SGD, same rate, steps and sigma).

**Gowalla (LightGCN split).** Full-graph LightGCN costs about 16 minutes per
epoch on two cores, so nobody converges here: every method gets the same
wall-clock training budget (``--budget`` minutes; evaluation time not
counted), with the test metrics taken at checkpoints, plotted against time.
The published LightGCN figure (Recall@20 0.1830, NDCG@20 0.1554, after
hundreds of epochs) is the reference, not a measurement of ours. Methods:
LightGCN, ours centralized without DP, ours federated without DP (10 sites,
Flower, as many rounds as the centralized run had epochs, scored at the first
round past each checkpoint of its own wall time), and ours with DP at epsilon 2
and 8 (the secure sum's mechanism, sampling rate 0.1, 50 steps: five epochs,
well inside the budget) and at epsilon 8 through Flower with per-site noise
(10 sites, the same rate and steps).

LightGCN: 64 dimensions, 3 layers, BPR with one uniform negative per positive,
Adam 1e-3, batches of 2,048 pairs, L2 1e-4 (the LightGCN paper's setting).

    python -m simulations.ranking_quality [--budget 10] [--seeds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from matplotlib.figure import Figure
from torch_geometric.nn import LightGCN

from client.train import site_graphs, site_model
from common.config import RunConfig
from common.data import SiteData, load_site
from common.evaluation import evaluate, ranking_sums
from simulations.harness import (
    MOVIELENS_IMPLICIT,
    best_round,
    data_config,
    federate,
    score,
    score_run,
    secure_sum_equivalent,
    train_central,
    write_results,
)

K = 20
PUBLISHED_GOWALLA = {"recall@20": 0.1830, "ndcg@20": 0.1554}
EPSILONS = (1.0, 2.0, 4.0, 8.0)
SITES = 10
GOWALLA_PER_SITE_DP = "ours, DP epsilon 8 (10 sites through Flower, per-site noise)"


def lightgcn(site: SiteData, stop: Callable[[int, float], bool], check: Callable) -> list[dict]:
    """Train PyG's LightGCN on ``site.train``. After every step ``check(scorer, epoch,
    seconds)`` may evaluate (``scorer()`` gives a scoring function) and return a record;
    ``stop(epoch, seconds)`` ends training."""
    users, items = site.num_users, site.catalogue.num_items
    train = site.train
    edge_index = torch.tensor(
        np.stack(
            [
                np.concatenate([train.user, train.item + users]),
                np.concatenate([train.item + users, train.user]),
            ]
        )
    )
    torch.manual_seed(0)
    model = LightGCN(users + items, embedding_dim=64, num_layers=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    pairs = np.stack([train.user, train.item], 1)
    rng = np.random.default_rng(0)
    trained, records, epoch = 0.0, [], 0

    def scorer() -> Callable[[np.ndarray], torch.Tensor]:
        """Scores from the current embeddings, propagated once per evaluation."""
        with torch.no_grad():
            embedding = model.get_embedding(edge_index)
        return lambda batch_users: embedding[torch.as_tensor(batch_users)] @ embedding[users:].T

    while not stop(epoch, trained):
        epoch += 1
        for batch in np.array_split(rng.permutation(pairs), max(1, len(pairs) // 2048)):
            start = time.perf_counter()
            embedding = model.get_embedding(edge_index)
            u = torch.as_tensor(batch[:, 0])
            positive = torch.as_tensor(batch[:, 1] + users)
            negative = torch.as_tensor(rng.integers(0, items, len(batch)) + users)
            loss = model.recommendation_loss(
                (embedding[u] * embedding[positive]).sum(-1),
                (embedding[u] * embedding[negative]).sum(-1),
                node_id=torch.cat([u, positive, negative]).unique(),
                lambda_reg=1e-4,
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            trained += time.perf_counter() - start
            record = check(scorer, epoch, trained)
            if record is not None:
                records.append(record)
            if stop(epoch, trained):
                break
    return records


def seen_in(site: SiteData) -> Callable[[int], np.ndarray]:
    order = np.argsort(site.train.user, kind="stable")
    starts = np.searchsorted(site.train.user[order], np.arange(site.num_users + 1))
    items = site.train.item[order]
    return lambda user: items[starts[user] : starts[user + 1]]


def movielens(seeds: int) -> dict:
    base = data_config("ml-100k", item_graph="none", **MOVIELENS_IMPLICIT)
    site = load_site(base, 0, 1)
    seen = seen_in(site)
    results: dict = {}

    # LightGCN, stopped by validation every 10 epochs.
    best: dict = {"val": -1.0, "since": 0}

    def check(scorer, epoch, seconds):
        if epoch % 10 or epoch == best.get("last"):
            return None
        best["last"] = epoch
        scores_of = scorer()
        val = ranking_sums(scores_of, seen, site.val, K).metrics()[f"recall@{K}"]
        if val > best["val"]:
            test = ranking_sums(scores_of, seen, site.test, K, exclude=site.val).metrics()
            best.update(val=val, since=0, epoch=epoch, test=test, seconds=seconds)
        else:
            best["since"] += 1
        return {"epoch": epoch, "val-recall@20": val}

    lightgcn(site, lambda epoch, _: epoch >= 400 or best["since"] >= 5, check)
    results["LightGCN (PyG), centralized"] = {k: best[k] for k in ("epoch", "val", "test")}
    print("lightgcn", results["LightGCN (PyG), centralized"], flush=True)

    results["ours, centralized, no DP"] = central_by_validation(base, site, 60)
    print("ours central", results["ours, centralized, no DP"], flush=True)
    plain = base.replace(dp=False, num_server_rounds=30, min_sites=SITES, early_stopping_rounds=0)
    results["ours, federated, no DP"] = best_round(
        federate(plain, SITES, keep_models=True), plain, f"recall@{K}"
    )
    print("ours federated", results["ours, federated, no DP"], flush=True)

    dp_setting = {"sample_rate": 0.5, "delta": 1e-5, "min_sites": SITES}
    curves: dict = {"secure aggregation off": {}, "secure aggregation on": {}}
    for epsilon in EPSILONS:
        off, on = [], []
        for seed in range(seeds):
            config = base.replace(
                **dp_setting,
                target_epsilon=epsilon,
                seed=seed,
                num_server_rounds=25,
                local_epochs=1,
            )
            off.append(score_run(federate(config, SITES), config)["test"])
            on.append(
                secure_sum_equivalent(base.replace(seed=seed, **dp_setting), epsilon, 50)["test"]
            )
        for name, runs in (("secure aggregation off", off), ("secure aggregation on", on)):
            values = [r[f"ndcg@{K}"] for r in runs]
            curves[name][str(epsilon)] = {
                "ndcg@20-mean": statistics.mean(values),
                "ndcg@20-spread": statistics.pstdev(values),
                "runs": runs,
            }
        print("dp", epsilon, {n: c[str(epsilon)]["ndcg@20-mean"] for n, c in curves.items()})
    results["ours, federated, DP (10 sites)"] = curves
    return results


def central_by_validation(config: RunConfig, site: SiteData, epochs: int) -> dict:
    """Ours on every user, no DP: the epoch with the best validation Recall@20."""
    config = config.replace(dp=False)
    torch.manual_seed(config.seed)
    model = site_model(site.catalogue, config)
    graphs = site_graphs(site, config)
    best = None
    for epoch in range(1, epochs + 1):
        train_central(model, graphs, config, epoch)
        val = evaluate(model, graphs, site.val, K).metrics()[f"recall@{K}"]
        if best is None or val > best[0]:
            best = (val, epoch, {k: v.clone() for k, v in model.state_dict().items()})
    return {"epoch": best[1], "val": best[0], "test": score(config, best[2])}


def gowalla(budget_minutes: float) -> dict:
    budget = budget_minutes * 60
    checkpoints = [budget * (i + 1) / 4 for i in range(4)]
    base = data_config(
        "gowalla", item_graph="none", task="ranking", val_fraction=0.0, grad_sample_mode="ghost"
    )
    site = load_site(base, 0, 1)
    seen = seen_in(site)
    results: dict = {"budget-minutes": budget_minutes, "published LightGCN": PUBLISHED_GOWALLA}

    done: set = set()

    def check(scorer, epoch, seconds):
        due = [c for c in checkpoints if seconds >= c and c not in done]
        if not due:
            return None
        done.update(due)
        return {
            "seconds": seconds,
            "epoch": epoch,
            **ranking_sums(scorer(), seen, site.test, K).metrics(),
        }

    results["LightGCN (PyG), centralized"] = lightgcn(site, lambda _, s: s >= budget, check)
    print("gowalla lightgcn", results["LightGCN (PyG), centralized"], flush=True)
    results["ours, centralized, no DP"] = timed_ours(base.replace(dp=False), site, checkpoints)
    print("gowalla ours", results["ours, centralized, no DP"], flush=True)
    for epsilon in (2.0, 8.0):
        config = base.replace(sample_rate=0.1, delta=1e-6)
        results[f"ours, DP epsilon {epsilon:g} (secure sum)"] = secure_sum_equivalent(
            config, epsilon, 50
        )
        print(
            "gowalla dp", epsilon, results[f"ours, DP epsilon {epsilon:g} (secure sum)"], flush=True
        )
    results[GOWALLA_PER_SITE_DP] = federated_dp_gowalla(base)
    print("gowalla federated dp", results[GOWALLA_PER_SITE_DP], flush=True)
    rounds = results["ours, centralized, no DP"][-1]["epoch"]
    plain = base.replace(
        dp=False,
        num_server_rounds=rounds,
        min_sites=SITES,
        evaluate_every=rounds + 1,
        early_stopping_rounds=0,
    )
    run_dir = federate(plain, SITES, keep_models=True)
    results["ours, federated, no DP"] = federated_curve(run_dir, plain, checkpoints)
    print("gowalla federated", results["ours, federated, no DP"], flush=True)
    return results


def federated_dp_gowalla(base: RunConfig) -> dict:
    """Ours through Flower with per-site noise (secure aggregation off): epsilon 8 per
    site at delta 1e-6, 5 rounds of one local epoch at sampling rate 0.1 (50 steps, as
    the secure sum's points), scored on the last round's model."""
    rounds = 5
    config = base.replace(
        sample_rate=0.1,
        delta=1e-6,
        target_epsilon=8.0,
        num_server_rounds=rounds,
        local_epochs=1,
        min_sites=SITES,
        evaluate_every=rounds + 1,  # federated evaluation only after the last round
    )
    run = score_run(federate(config, SITES), config)
    return {k: run[k] for k in ("test", "epsilon", "seconds-per-round")}


def timed_ours(config: RunConfig, site: SiteData, checkpoints: list[float]) -> list[dict]:
    """Ours on every user, trained for the budget; test metrics at the checkpoints."""
    torch.manual_seed(config.seed)
    model = site_model(site.catalogue, config)
    graphs = site_graphs(site, config)
    trained, epoch, records = 0.0, 0, []
    while trained < checkpoints[-1]:
        epoch += 1
        start = time.perf_counter()
        train_central(model, graphs, config, epoch)
        trained += time.perf_counter() - start
        while len(records) < len(checkpoints) and trained >= checkpoints[len(records)]:
            records.append(
                {
                    "seconds": trained,
                    "epoch": epoch,
                    **evaluate(model, graphs, site.test, K).metrics(),
                }
            )
    return records


def federated_curve(run_dir, config: RunConfig, checkpoints: list[float]) -> list[dict]:
    """Test metrics of the first kept round past each checkpoint of the run's wall time
    (and of the last round), against that wall time."""
    rounds = json.loads((run_dir / "metrics.json").read_text())
    start = rounds["0"]["finished_at"]
    seconds = {int(r): m["finished_at"] - start for r, m in rounds.items() if int(r) > 0}
    last = max(seconds)
    chosen = sorted(
        {min((r for r in seconds if seconds[r] >= c), default=last) for c in checkpoints} | {last}
    )
    return [
        {
            "round": r,
            "seconds": seconds[r],
            **score(config, torch.load(run_dir / f"model-{r}.pt")),
        }
        for r in chosen
    ]


def figure_of(results: dict) -> Figure:
    """MovieLens-100K: NDCG@20 per method and epsilon; Gowalla: Recall@20 against time."""
    figure = Figure(figsize=(11, 4))
    left, right = figure.subplots(1, 2)
    ml = results["ml-100k"]
    names = ["LightGCN (PyG), centralized", "ours, centralized, no DP", "ours, federated, no DP"]
    left.bar(range(3), [ml[n]["test"][f"ndcg@{K}"] for n in names], color="grey")
    dp = ml["ours, federated, DP (10 sites)"]
    positions = range(3, 3 + len(EPSILONS))
    for name, marker in (("secure aggregation off", "o"), ("secure aggregation on", "s")):
        values = [dp[name][str(e)]["ndcg@20-mean"] for e in EPSILONS]
        left.plot(positions, values, marker, label=f"federated DP, {name}")
    left.set_xticks(
        [*range(3), *positions],
        ["LightGCN\ncentral", "ours\ncentral", "ours\nfederated"]
        + [f"DP\neps {e:g}" for e in EPSILONS],
    )
    left.set(ylabel=f"test NDCG@{K}", title="MovieLens-100K, implicit")
    left.legend(fontsize=7)
    gw = results["gowalla"]
    for name, curve in gw.items():
        if isinstance(curve, list) and curve:
            right.plot(
                [c["seconds"] / 60 for c in curve],
                [c[f"recall@{K}"] for c in curve],
                marker="o",
                label=name,
            )
    dp_points = [(n, v) for n, v in gw.items() if n.startswith("ours, DP")]
    for (name, value), color in zip(dp_points, ("tab:red", "tab:purple", "tab:brown"), strict=True):
        right.axhline(value["test"][f"recall@{K}"], linestyle=":", color=color, label=name)
    right.axhline(
        PUBLISHED_GOWALLA["recall@20"],
        color="k",
        linestyle="--",
        label="published LightGCN (hundreds of epochs)",
    )
    right.set(xlabel="training minutes", ylabel=f"test Recall@{K}", title="Gowalla, equal budget")
    right.set_ylim(0, 0.2)
    right.legend(fontsize=6, loc="lower right")
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=10.0, help="Gowalla minutes per method")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {"ml-100k": movielens(args.seeds), "gowalla": gowalla(args.budget)}
    print(write_results("ranking_quality", results, figure_of(results)))


if __name__ == "__main__":
    main()
