"""Serving latency: top-10 over the full catalogue for one user at a time.

For each query the site builds the user's ego graph from their training items,
computes the user vector, scores every catalogue item, leaves out the user's
own items and takes the top 10 (``common.evaluation.recommend``), on the CPU
with two threads. Latency does not depend on the weights, so the model is
freshly initialised. 1,000 queries for random users after 50 warm-up
queries; p50 and p99 in milliseconds. Catalogues: MovieLens-100K (1,682 items)
and Gowalla (40,981 items).

    python -m simulations.serving
"""

from __future__ import annotations

import time

import numpy as np
import torch
from matplotlib.figure import Figure

from client.train import site_graphs, site_model
from common.data import load_site
from common.evaluation import recommend
from simulations.harness import data_config, write_results

QUERIES, WARM_UP = 1000, 50


def latencies(dataset: str) -> dict[str, float]:
    config = data_config(dataset, item_graph="none")
    site = load_site(config, 0, 1)
    torch.manual_seed(0)
    model = site_model(site.catalogue, config)
    graphs = site_graphs(site, config)
    users = np.random.default_rng(0).integers(0, site.num_users, QUERIES + WARM_UP)
    seconds = []
    for user in users:
        start = time.perf_counter()
        recommend(model, graphs, np.array([user]), 10)
        seconds.append(time.perf_counter() - start)
    ms = np.array(seconds[WARM_UP:]) * 1000
    return {
        "items": site.catalogue.num_items,
        "p50-ms": float(np.percentile(ms, 50)),
        "p99-ms": float(np.percentile(ms, 99)),
        "queries": QUERIES,
    }


def main() -> None:
    torch.set_num_threads(2)
    results = {dataset: latencies(dataset) for dataset in ("ml-100k", "gowalla")}
    print(results)
    figure = Figure(figsize=(5, 3.5))
    axes = figure.subplots()
    names = [f"{d}\n{r['items']} items" for d, r in results.items()]
    for offset, key in enumerate(("p50-ms", "p99-ms")):
        axes.bar(
            [i + 0.35 * offset for i in range(len(results))],
            [r[key] for r in results.values()],
            width=0.35,
            label=key,
        )
    axes.set_xticks([0.175, 1.175], names)
    axes.set(ylabel="milliseconds", title="Top-10 for one user, full catalogue")
    axes.legend()
    print(write_results("serving", results, figure))


if __name__ == "__main__":
    main()
