"""Privacy-utility curves for both datasets in one plot, from the quality benchmarks.

Reads ``results/rating_quality.json`` (MovieLens-100K u1, test RMSE against
epsilon, secure aggregation off and on) and ``results/ranking_quality.json``
(MovieLens-100K implicit: test NDCG@20 against epsilon; Gowalla: test
Recall@20 at epsilon 2 and 8 with the secure sum, at 8 with per-site noise)
and draws them side by side with each dataset's non-private reference. Run
the two quality scripts first.

    python -m simulations.privacy_utility
"""

from __future__ import annotations

import json

from matplotlib.figure import Figure

from simulations.harness import RESULTS, write_results
from simulations.ranking_quality import GOWALLA_PER_SITE_DP


def main() -> None:
    rating = json.loads((RESULTS / "rating_quality.json").read_text())
    ranking = json.loads((RESULTS / "ranking_quality.json").read_text())
    figure = Figure(figsize=(12, 3.8))
    axes = figure.subplots(1, 3)
    points: dict = {}

    def curves(ax, dp: dict, key: str, name: str) -> None:
        for setting, marker in (("secure aggregation off", "o"), ("secure aggregation on", "s")):
            eps = sorted(float(e) for e in dp[setting])
            values = [dp[setting][str(e)][key] for e in eps]
            ax.plot(eps, values, marker=marker, label=setting)
            points[f"{name}, {setting}"] = dict(zip(map(str, eps), values, strict=True))

    curves(axes[0], rating["federated, DP (10 sites)"], "test-rmse-mean", "ml-100k rating")
    axes[0].axhline(
        rating["federated, no DP"]["test"]["rmse"],
        linestyle="--",
        color="grey",
        label="federated, no DP",
    )
    axes[0].set(
        xscale="log",
        xlabel="epsilon",
        ylabel="test RMSE (lower is better)",
        title="MovieLens-100K u1, rating",
    )
    movielens = ranking["ml-100k"]
    curves(axes[1], movielens["ours, federated, DP (10 sites)"], "ndcg@20-mean", "ml-100k ranking")
    axes[1].axhline(
        movielens["ours, federated, no DP"]["test"]["ndcg@20"],
        linestyle="--",
        color="grey",
        label="federated, no DP",
    )
    axes[1].set(
        xscale="log", xlabel="epsilon", ylabel="test NDCG@20", title="MovieLens-100K, implicit"
    )

    gowalla = ranking["gowalla"]
    eps = [2.0, 8.0]
    values = [gowalla[f"ours, DP epsilon {e:g} (secure sum)"]["test"]["recall@20"] for e in eps]
    per_site = gowalla[GOWALLA_PER_SITE_DP]["test"]["recall@20"]
    axes[2].plot([8.0], [per_site], "o", label="secure aggregation off")
    axes[2].plot(eps, values, marker="s", label="secure aggregation on")
    points["gowalla ranking, secure aggregation off"] = {"8.0": per_site}
    points["gowalla ranking, secure aggregation on"] = dict(zip(map(str, eps), values, strict=True))
    axes[2].axhline(
        gowalla["ours, centralized, no DP"][-1]["recall@20"],
        linestyle="--",
        color="grey",
        label="centralized, no DP (same budget)",
    )
    axes[2].set(xscale="log", xlabel="epsilon", ylabel="test Recall@20", title="Gowalla")
    for ax in axes:
        ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    print(write_results("privacy_utility", {"points": points}, figure))


if __name__ == "__main__":
    main()
