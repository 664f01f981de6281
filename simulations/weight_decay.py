"""The GCN's default weight decay, chosen on validation without DP (issue 15.5).

MovieLens-100K, 10 sites through Flower's simulation engine, the GCN alone
(``item-graph = "none"``) with the app's defaults for 30 rounds and no DP, each
run's model the best validation round (``best-model.pt``): validation RMSE on
u1 (10 % of ``u1.base`` per user) and validation NDCG@20 on the implicit rule
(per user 20 % test, 10 % validation), for every ``weight-decay`` of the grid.
The test split is not touched.

    python -m simulations.weight_decay
"""

from __future__ import annotations

import json

import torch
from matplotlib.figure import Figure

from simulations.harness import MOVIELENS_IMPLICIT, data_config, federate, score, write_results

GRID = (0.0, 1e-5, 1e-4, 1e-3)
SITES, ROUNDS = 10, 30
TASKS = {
    "u1 ratings": ({"split": "u1"}, "rmse"),
    "implicit": (MOVIELENS_IMPLICIT, "ndcg@20"),
}


def main() -> None:
    results: dict = {}
    for name, (changes, metric) in TASKS.items():
        results[name] = {}
        for decay in GRID:
            config = data_config("ml-100k", **changes).replace(
                item_graph="none",
                dp=False,
                num_server_rounds=ROUNDS,
                early_stopping_rounds=0,  # every round, the best one kept
                min_sites=SITES,
                weight_decay=decay,
            )
            run_dir = federate(config, SITES)
            best = json.loads((run_dir / "status.json").read_text())["best-round"]
            value = score(config, torch.load(run_dir / "best-model.pt"), "val")[metric]
            results[name][str(decay)] = {"best-round": best, f"val-{metric}": value}
            print(name, decay, best, value, flush=True)
    figure = Figure(figsize=(9, 3.5))
    for axes, (name, (_, metric)) in zip(figure.subplots(1, 2), TASKS.items(), strict=True):
        values = [results[name][str(d)][f"val-{metric}"] for d in GRID]
        axes.plot(range(len(GRID)), values, marker="o")
        axes.set_xticks(range(len(GRID)), [str(d) for d in GRID])
        axes.set(title=name, xlabel="weight-decay", ylabel=f"val {metric}")
    print(write_results("weight_decay", results, figure))


if __name__ == "__main__":
    main()
