"""Secure aggregation on and off: MovieLens-100K u1, 10 sites, epsilon 8.

Both runs spend epsilon 8 (delta 1e-5) per site over 50 DP-SGD steps at
sampling rate 0.5, with sigma planned by ``target-epsilon``:

- off: every site runs its own DP-SGD (25 rounds of 2 local steps) and the
  server averages the item side: each site's noise protects its ~94 users;
- on: every round each site sends one step's noised gradient sum with a tenth
  of the noise variance (``secagg-min-sites = 10``) through SecAgg+, the server
  steps with the sum (50 rounds).

Reports test RMSE over all of u1.test (mean and spread over seeds), both
epsilons and the wall time per round. The hyper-parameters are those
``simulations/rating_quality.py`` uses (chosen there by validation RMSE; that
search is not charged to the privacy budget).

    python simulations/secure_sum_benchmark.py [--seeds 2]
"""

from __future__ import annotations

import argparse
import statistics

from matplotlib.figure import Figure

from simulations.harness import data_config, federate, score_run, write_results

SHARED = {
    "split": "u1",
    "delta": 1e-5,
    "target_epsilon": 8.0,
    "sample_rate": 0.5,
    "learning_rate": 0.05,
    "embedding_dim": 8,
    "min_sites": 10,
}
SETTINGS = {
    "off": {"secure_aggregation": False, "num_server_rounds": 25, "local_epochs": 1},
    "on": {"secure_aggregation": True, "secagg_min_sites": 10, "num_server_rounds": 50},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    results = {}
    for name, setting in SETTINGS.items():
        runs = []
        for seed in range(args.seeds):
            config = data_config("ml-100k", item_graph="none", seed=seed, **SHARED, **setting)
            runs.append(score_run(federate(config, 10), config))
            print(name, seed, runs[-1], flush=True)
        rmse = [r["test"]["rmse"] for r in runs]
        results[name] = {
            "settings": SHARED | setting,
            "runs": runs,
            "test-rmse-mean": statistics.mean(rmse),
            "test-rmse-spread": statistics.pstdev(rmse),
            "seconds-per-round-mean": statistics.mean(r["seconds-per-round"] for r in runs),
        }
    figure = Figure(figsize=(5, 3.5))
    axes = figure.subplots()
    names = list(results)
    axes.bar(
        names,
        [results[n]["test-rmse-mean"] for n in names],
        yerr=[results[n]["test-rmse-spread"] for n in names],
    )
    axes.set(ylabel="test RMSE (u1)", title="Secure aggregation off / on, epsilon 8, 10 sites")
    axes.set_ylim(0.9, max(results[n]["test-rmse-mean"] for n in names) + 0.05)
    print(write_results("secure_aggregation", results, figure))
    for name in names:
        r = results[name]
        print(
            f"{name:4} test RMSE {r['test-rmse-mean']:.4f} +- {r['test-rmse-spread']:.4f}  "
            f"{r['seconds-per-round-mean']:.1f} s/round"
        )


if __name__ == "__main__":
    main()
