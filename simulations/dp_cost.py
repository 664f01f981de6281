"""The cost of DP: local epoch time and peak memory, DP-SGD over plain training.

One site's share of the data (site 0 of 10, ``partition = iid``), one local
epoch (``1 / sample-rate`` = 10 steps), the app's default model: plain
training, DP-SGD with Opacus's per-sample gradients by hooks, and by ghost
clipping, one after another, each in a fresh process started the same way (so
that one mode's freed memory cannot hide the next one's). Time is the median of
three epochs after one warm-up epoch; memory is the peak resident memory during
the four epochs above the level just before them (sampled every 5 ms).
Catalogues: MovieLens-100K (1,682 items) and Gowalla (40,981 items).

    python -m simulations.dp_cost
"""

from __future__ import annotations

import multiprocessing
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import psutil
import torch
from matplotlib.figure import Figure

from client.train import site_graphs, site_model
from common.data import load_site
from simulations.harness import data_config, train_central, write_results

MODES = {
    "plain": {"dp": False},
    "dp-hooks": {"grad_sample_mode": "hooks"},
    "dp-ghost": {"grad_sample_mode": "ghost"},
}


class PeakMemory:
    """Peak resident memory of this process above its level at entry, in MB."""

    def __enter__(self) -> PeakMemory:
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.megabytes = (self.peak - self.start) / 2**20


def measure(dataset: str, mode: dict, epochs: int = 3) -> dict[str, float]:
    torch.set_num_threads(2)
    config = data_config(dataset, item_graph="none", **mode)
    site = load_site(config, 0, 10)
    torch.manual_seed(0)
    model = site_model(site.catalogue, config)
    graphs = site_graphs(site, config)
    seconds = []
    with PeakMemory() as memory:
        for epoch in range(epochs + 1):
            start = time.perf_counter()
            train_central(model, graphs, config, epoch + 1)
            if epoch:  # the first epoch warms up
                seconds.append(time.perf_counter() - start)
    return {
        "users": site.num_users,
        "items": site.catalogue.num_items,
        "seconds-per-epoch": statistics.median(seconds),
        "peak-mb": memory.megabytes,
    }


def in_fresh_process(dataset: str, mode: dict) -> dict[str, float]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, dataset, mode).result()


def main() -> None:
    results = {}
    for dataset in ("ml-100k", "gowalla"):
        results[dataset] = {name: in_fresh_process(dataset, m) for name, m in MODES.items()}
        plain = results[dataset]["plain"]
        for name in ("dp-hooks", "dp-ghost"):
            entry = results[dataset][name]
            entry["time-ratio"] = entry["seconds-per-epoch"] / plain["seconds-per-epoch"]
            entry["memory-ratio"] = entry["peak-mb"] / max(plain["peak-mb"], 1.0)
        print(dataset, results[dataset], flush=True)
    figure = Figure(figsize=(6, 3.5))
    axes = figure.subplots()
    for offset, name in enumerate(("dp-hooks", "dp-ghost")):
        ratios = [results[d][name]["time-ratio"] for d in results]
        axes.bar([i + 0.35 * offset for i in range(len(results))], ratios, width=0.35, label=name)
    axes.set_xticks(
        [0.175, 1.175], [f"{d} ({results[d]['plain']['items']} items)" for d in results]
    )
    axes.axhline(3, color="grey", linestyle=":")
    axes.axhline(8, color="grey", linestyle="--")
    axes.set(ylabel="epoch time, DP / plain", title="Cost of DP-SGD (targets: 3x, 8x)")
    axes.legend()
    print(write_results("dp_cost", results, figure))


if __name__ == "__main__":
    main()
