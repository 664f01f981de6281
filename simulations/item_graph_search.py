"""Item-graph filters from federated sums: which configuration works, with and without DP.

Every filter here is a function of sums over users (``common.graph.filters``): item
degrees and the item-item Gram matrix, released once with the Gaussian
mechanism under DP. Hyper-parameters are chosen on validation only; each
reported test figure is computed once, for the setting chosen. DP figures are
the mean and spread (population std) over ``--seeds`` noise draws; under DP the
setting with the best validation mean over those draws is chosen. That search
looked at private validation data and is *not* charged to the privacy budget
(as in ``rating_quality.py``): a deployment would tune on public data or charge it.

Cases (``--cases``, comma-separated; each writes its own key of the results):

- ``ml-ranking``: MovieLens-100K implicit (per user 20% test, 10% validation,
  by seed), no DP. MostPop; GF-CF-style graph filters over user exponent eta
  (``x_u = r_u / |N(u)|^eta``), degree exponent beta, k, alpha; EASE on the
  Gram; the app's graph filter plus EASE's weights of the degree rows' Gram
  (``common.graph.filters.with_ease``: ridge and weight). Filters use the
  training split only (as LightGCN did, 0.3871 NDCG@20).
- ``ml-dp``: the same data at epsilon 8, delta 1e-5: (a) noise once on the
  federation's sum (what secure aggregation gives), (b) each of 10 sites adds
  the full noise to its own sum. Degree release (for normalisation and
  top-M items) and Gram release share the budget (``1/z^2 = sum 1/z_i^2``);
  the split is part of the search. MostPop and DP MostPop (the degree vector
  released with the whole budget) by the same code.
- ``gowalla``: Gowalla (LightGCN split), no DP: GF-CF with the exact sparse
  Gram, hyper-parameters on validation (10% of train.txt per user, beta 1/2
  as in GF-CF), then refitted on all of train.txt for test; every
  stage timed, peak memory; the linear part kept to its top-N entries per
  item row (what a site would download) against the exact one.
- ``gowalla-dp``: Gowalla at epsilon 8, delta 1e-6: DP MostPop against the dense
  Gram of the top-M items by released degree (noise once on the sum), both
  refitted on all of train.txt for test; the search scores a fixed sample of
  5,000 validation users.
- ``ml-rating``: MovieLens-100K u1 (RMSE over all of u1.test, clipped to 1-5;
  validation 10% of u1.base per user): global mean, user mean + item offset
  (exact sums), and the residual-covariance neighbourhood predictor, without
  DP and at epsilon 8 (noise once on the sum), with the DP release of the
  item statistics alone as the DP baseline. Settings are chosen on
  validation with statistics of the training part; the test figure refits
  (re-releases, fresh noise) on all of u1.base.

DP test figures always come from fresh noise draws, not the ones the search saw.

    python -m simulations.item_graph_search [--cases ml-ranking,ml-dp,...] [--seeds 2] [--plot]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from matplotlib.figure import Figure

from common.accounting import Event, noise_multiplier_for
from common.data import Interactions, SiteData, load_dataset, load_site
from common.data import partition_sites as site_of_each_user
from common.evaluation import ranking_sums
from common.graph.filters import (
    ItemFilter,
    bounded_rows,
    covariance_similarity,
    ease_filter,
    gram_sum,
    graph_filter,
    item_offset_sums,
    item_offsets,
    item_sum,
    keep_top_per_row,
    neighbourhood_residuals,
    release_symmetric,
    release_vector,
    residual_rows,
    split_noise_multiplier,
    top_items,
    user_means,
    user_rows,
    with_ease,
)
from simulations.harness import MOVIELENS_IMPLICIT, RESULTS, data_config, write_results

K = 20
NDCG, RECALL = f"ndcg@{K}", f"recall@{K}"
EPSILON = 8.0
LIGHTGCN_ML100K = {RECALL: 0.3266, NDCG: 0.3871}  # ranking_quality.json, same split
PUBLISHED_GOWALLA = {RECALL: 0.1830, NDCG: 0.1554}
SITES = 10
DEGREE_BOUND = 10.0  # the app's item-graph-degree-bound
GOWALLA_VAL_USERS = 5000
CASES = ("ml-ranking", "ml-dp", "gowalla", "gowalla-dp", "ml-rating")


# -- ranking data and evaluation --------------------------------------------------


@dataclass(frozen=True)
class RankingData:
    """Training rows of every user and the held-out parts to score them on."""

    rows: sp.csr_matrix
    seen: Callable[[int], np.ndarray]
    val: Interactions
    test: Interactions
    exclude_at_test: Interactions | None

    @property
    def num_items(self) -> int:
        return self.rows.shape[1]


def one_release(epsilon: float, delta: float) -> float:
    """The noise multiplier of one Gaussian release at ``(epsilon, delta)``."""
    return noise_multiplier_for(epsilon, delta, "prv", Event(0.0, 1.0, 1))


def ranking_data(site: SiteData, refit: bool = False) -> RankingData:
    """``site``'s training rows; with ``refit`` train + validation, for the test figure."""
    train = Interactions.concat([site.train, site.val]) if refit else site.train
    rows = user_rows(train, site.num_users, site.catalogue.num_items)
    return RankingData(
        rows=rows,
        seen=lambda user: rows.indices[rows.indptr[user] : rows.indptr[user + 1]],
        val=site.val,
        test=site.test,
        exclude_at_test=None if refit else site.val,
    )


def evaluate(
    scores: Callable[[np.ndarray], np.ndarray],
    data: RankingData,
    part: str,
    users: np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@20 and NDCG@20 (the project's code) of a scorer of user indices on ``part``."""
    heldout = data.val if part == "val" else data.test
    if users is not None:
        heldout = heldout.select(np.isin(heldout.user, users))
    exclude = data.exclude_at_test if part == "test" else None
    return ranking_sums(
        lambda batch: torch.from_numpy(scores(batch)), data.seen, heldout, K, exclude
    ).metrics()


def filter_scores(item_filter: ItemFilter, data: RankingData) -> Callable:
    return lambda batch: item_filter.scores(data.rows[batch])


def popularity_scores(degrees: np.ndarray) -> Callable:
    return lambda batch: np.tile(degrees.astype(np.float32), (len(batch), 1))


def graph_variants(
    base: ItemFilter, ks: tuple[int, ...], alphas: tuple[float, ...]
) -> Iterator[tuple[dict, ItemFilter]]:
    """The linear part alone, the low-pass part alone and their blends, for each k
    up to the base filter's."""
    yield {"k": 0, "alpha": 0.0}, dataclasses.replace(base, alpha=0.0)
    for k in ks:
        low = base.eigenvectors[:, :k]
        yield (
            {"k": k, "alpha": "low-pass only"},
            dataclasses.replace(base, linear=None, eigenvectors=low, alpha=1.0),
        )
        for alpha in alphas:
            yield {"k": k, "alpha": alpha}, dataclasses.replace(base, eigenvectors=low, alpha=alpha)


def peak_memory_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def key_of(setting: dict) -> str:
    return json.dumps(setting, sort_keys=True)


def spread(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.mean(values),
        "spread": statistics.pstdev(values),
        "runs": values,
    }


# -- MovieLens-100K ranking, no DP -------------------------------------------------


def movielens_ranking_site() -> SiteData:
    return load_site(data_config("ml-100k", **MOVIELENS_IMPLICIT), 0, 1)


def movielens_ranking() -> dict:
    data = ranking_data(movielens_ranking_site())
    degrees = item_sum(data.rows)
    results: dict = {"LightGCN (ranking_quality.json)": LIGHTGCN_ML100K}
    results["MostPop"] = {"test": evaluate(popularity_scores(degrees), data, "test")}
    grid: list[tuple[dict, float]] = []
    best: dict[str, tuple[float, dict, ItemFilter]] = {}

    def consider(family: str, setting: dict, item_filter: ItemFilter) -> None:
        value = evaluate(filter_scores(item_filter, data), data, "val")[NDCG]
        grid.append(({"family": family, **setting}, value))
        if family not in best or value > best[family][0]:
            best[family] = (value, setting, item_filter)

    for eta in (0.0, 0.5):
        gram = gram_sum(bounded_rows(data.rows, eta, np.inf))
        for beta in (0.0, 0.25, 0.5):
            base = graph_filter(gram, degrees, beta, 256, 1.0, data.num_items)
            for setting, item_filter in graph_variants(
                base, (8, 16, 32, 64, 128, 256), (0.1, 0.3, 1.0, 3.0)
            ):
                consider("graph filter", {"eta": eta, "beta": beta, **setting}, item_filter)
                if eta == beta == 0.5:
                    consider("GF-CF (eta = beta = 1/2)", setting, item_filter)
            print("ml-ranking graph", eta, beta, best["graph filter"][:2], flush=True)
        for ridge in (1, 3, 10, 30, 100, 300, 1000, 3000):
            consider("EASE", {"eta": eta, "ridge": ridge}, ease_filter(gram, ridge, data.num_items))
        print("ml-ranking ease", eta, best["EASE"][:2], flush=True)
    app_filter = graph_filter(
        gram_sum(bounded_rows(data.rows, 0.5, 1.0)), degrees, 0.25, 16, 1.0, data.num_items
    )
    degree_gram = gram_sum(bounded_rows(data.rows, 0.0, DEGREE_BOUND))
    for ridge in (100, 300, 1000):
        for weight in (1, 2, 3, 5):
            blended = with_ease(app_filter, degree_gram, ridge, weight)
            consider("graph filter + EASE", {"ridge": ridge, "weight": weight}, blended)
    print("ml-ranking graph + ease", best["graph filter + EASE"][:2], flush=True)
    for family, (value, setting, item_filter) in best.items():
        results[family] = {
            "setting": setting,
            "val": value,
            "test": evaluate(filter_scores(item_filter, data), data, "test"),
        }
    results["grid (val NDCG@20)"] = [{**s, "val": v} for s, v in grid]
    return results


# -- MovieLens-100K and Gowalla ranking under DP ----------------------------------


@dataclass(frozen=True)
class Releases:
    """What the server holds after the DP rounds: released degrees (or None), the items
    the Gram covers, and the released Gram over them."""

    degrees: np.ndarray | None
    degree_noise_std: float
    items: np.ndarray
    gram: np.ndarray


def released_sums(
    rows: sp.csr_matrix,
    site_of_user: np.ndarray,
    degree_share: float,
    degree_bound: float,
    top_m: int | None,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> Releases:
    """Round 1: every site releases its degree sum (bound ``degree_bound``, share
    ``degree_share`` of the budget); round 2: every site releases its Gram over the
    ``top_m`` items of largest released degree (all items without ``top_m``). Each site
    adds the noise for its whole release (one site: noise once on the federation's sum)."""
    n = rows.shape[1]
    sites = np.unique(site_of_user)
    if degree_share > 0:
        z_degree, z_gram = split_noise_multiplier(
            noise_multiplier, [degree_share, 1 - degree_share]
        )
        degrees = released_degrees(rows, site_of_user, degree_bound, z_degree, rng)
        noise_std = z_degree * degree_bound * np.sqrt(len(sites))
    else:
        z_gram, degrees, noise_std = noise_multiplier, None, 0.0
    items = np.arange(n) if top_m is None else top_items(degrees, top_m)
    gram_rows = bounded_rows(rows[:, items], 0.5, 1.0)
    gram = sum(
        release_symmetric(gram_sum(gram_rows[site_of_user == s]), 1.0, z_gram, rng) for s in sites
    )
    return Releases(degrees, noise_std, items, gram)


def dp_filters(
    releases: Releases,
    num_items: int,
    betas: tuple[float, ...],
    ks: tuple[int, ...],
    alphas: tuple[float, ...],
    ridges: tuple[float, ...],
) -> Iterator[tuple[dict, ItemFilter]]:
    """Every filter of the search from one set of releases. Without a degree release
    only un-normalised filters (beta 0, EASE) are possible."""
    items, gram = releases.items, releases.gram
    if releases.degrees is None:
        degrees, floors, betas = np.ones(len(items)), (1.0,), (0.0,)
    else:
        degrees = releases.degrees[items]
        floors = tuple(max(1.0, f * releases.degree_noise_std) for f in (1.0, 3.0))
    for beta in betas:
        for floor in floors if beta > 0 else floors[:1]:
            base = graph_filter(gram, degrees, beta, max(ks), 1.0, num_items, items, floor)
            for setting, item_filter in graph_variants(base, ks, alphas):
                floor_setting = {"degree floor": floor} if beta > 0 else {}
                yield (
                    {"family": "graph filter", "beta": beta, **floor_setting, **setting},
                    item_filter,
                )
    for ridge in ridges:
        yield {"family": "EASE", "ridge": ridge}, ease_filter(gram, ridge, num_items, items)


def released_degrees(
    rows: sp.csr_matrix,
    site_of_user: np.ndarray,
    bound: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """The degree vector (each user's row bounded to ``bound``) released by every site
    with its own noise, summed."""
    degree_rows = bounded_rows(rows, 0.0, bound)
    return sum(
        release_vector(item_sum(degree_rows[site_of_user == s]), bound, noise_multiplier, rng)
        for s in np.unique(site_of_user)
    )


def dp_mostpop(
    data: RankingData,
    test_data: RankingData,
    site_of_user: np.ndarray,
    noise_multiplier: float,
    seeds: int,
    bounds: tuple[float, ...],
    val_users: np.ndarray | None = None,
) -> dict:
    """The degree vector released with the whole budget; the bound chosen on validation
    (mean over noise draws), the test figure from fresh draws on ``test_data``."""
    by_bound = {}
    for bound in bounds:
        val = [
            evaluate(
                popularity_scores(
                    released_degrees(
                        data.rows, site_of_user, bound, noise_multiplier, np.random.default_rng(s)
                    )
                ),
                data,
                "val",
                val_users,
            )[NDCG]
            for s in range(seeds)
        ]
        by_bound[bound] = statistics.mean(val)
    bound = max(by_bound, key=by_bound.get)
    tests = [
        evaluate(
            popularity_scores(
                released_degrees(
                    test_data.rows, site_of_user, bound, noise_multiplier, test_rng(seed)
                )
            ),
            test_data,
            "test",
        )
        for seed in range(seeds)
    ]
    return {
        "degree bound": bound,
        "val NDCG@20 by bound": {str(b): v for b, v in by_bound.items()},
        "test": {m: spread([t[m] for t in tests]) for m in (RECALL, NDCG)},
    }


def test_rng(seed: int) -> np.random.Generator:
    """Noise for the test figure's releases: fresh draws, not the ones the search saw."""
    return np.random.default_rng(1000 + seed)


def dp_search(
    data: RankingData,
    site_of_user: np.ndarray,
    noise_multiplier: float,
    seeds: int,
    degree_bound: float,
    plans: list[tuple[float, int | None]],
    grid: dict,
    test_data: RankingData,
    val_users: np.ndarray | None = None,
) -> dict:
    """For each release plan (degree share, top-M) and noise draw, every filter of
    ``grid`` on validation; the setting with the best mean is released again (fresh
    draws) from ``test_data``'s rows and scored on test."""
    values: dict[str, list[float]] = {}
    settings: dict[str, dict] = {}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        for share, top_m in plans:
            start = time.perf_counter()
            releases = released_sums(
                data.rows, site_of_user, share, degree_bound, top_m, noise_multiplier, rng
            )
            for setting, item_filter in dp_filters(releases, data.num_items, **grid):
                setting = {"degree share": share, "top-M": top_m, **setting}
                key = key_of(setting)
                settings[key] = setting
                values.setdefault(key, []).append(
                    evaluate(filter_scores(item_filter, data), data, "val", val_users)[NDCG]
                )
            print("dp plan", seed, share, top_m, f"{time.perf_counter() - start:.0f}s", flush=True)
    mean = {key: statistics.mean(v) for key, v in values.items() if len(v) == seeds}
    chosen = max(mean, key=mean.get)
    setting = settings[chosen]
    tests = []
    for seed in range(seeds):
        releases = released_sums(
            test_data.rows,
            site_of_user,
            setting["degree share"],
            degree_bound,
            setting["top-M"],
            noise_multiplier,
            test_rng(seed),
        )
        item_filter = next(
            f
            for s, f in dp_filters(releases, data.num_items, **grid)
            if key_of({"degree share": setting["degree share"], "top-M": setting["top-M"], **s})
            == chosen
        )
        tests.append(evaluate(filter_scores(item_filter, test_data), test_data, "test"))
    best_by = {}
    for name, field in (("degree share", "degree share"), ("top-M", "top-M"), ("family", "family")):
        for key, value in mean.items():
            label = f"{name}={settings[key][field]}"
            if label not in best_by or value > best_by[label]["val"]:
                best_by[label] = {"val": value, "setting": settings[key]}
    return {
        "setting": setting,
        "val NDCG@20": mean[chosen],
        "test": {m: spread([t[m] for t in tests]) for m in (RECALL, NDCG)},
        "best val per choice": best_by,
    }


def movielens_dp(seeds: int) -> dict:
    site = movielens_ranking_site()
    data = ranking_data(site)
    config = data_config("ml-100k", **MOVIELENS_IMPLICIT)
    z = one_release(EPSILON, 1e-5)
    results: dict = {"noise multiplier (one release)": z}
    grid = {
        "betas": (0.0, 0.25, 0.5),
        "ks": (8, 16, 32, 64),
        "alphas": (1.0, 3.0, 10.0),
        "ridges": (10, 30, 100, 300, 1000),
    }
    for name, site_of_user in (
        ("(a) noise once on the sum", np.zeros(site.num_users, np.int64)),
        (
            f"(b) per-site noise, {SITES} sites",
            site_of_each_user(load_dataset(config), config, SITES),
        ),
    ):
        mostpop = dp_mostpop(data, data, site_of_user, z, seeds, (1.0, 3.0, 10.0, 30.0))
        print("ml-dp", name, "DP MostPop", mostpop["test"][NDCG]["mean"], flush=True)
        plans = [(0.0, None)] + [
            (share, top_m) for share in (0.1, 0.25) for top_m in (None, 600, 300, 150)
        ]
        search = dp_search(data, site_of_user, z, seeds, mostpop["degree bound"], plans, grid, data)
        print("ml-dp", name, search["setting"], search["test"][NDCG], flush=True)
        results[name] = {"DP MostPop": mostpop, "item graph": search}
    return results


# -- Gowalla ------------------------------------------------------------------------


def gowalla_site() -> SiteData:
    return load_site(data_config("gowalla", task="ranking"), 0, 1)


def validation_users(data: RankingData) -> np.ndarray:
    users = np.unique(data.val.user)
    return np.sort(np.random.default_rng(0).choice(users, GOWALLA_VAL_USERS, replace=False))


def timed(stages: dict, name: str, run: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    value = run()
    stages[name] = {"seconds": time.perf_counter() - start, "peak memory GB": peak_memory_gb()}
    print("gowalla", name, stages[name], flush=True)
    return value


def gf_cf_exact(data: RankingData, k: int, stages: dict) -> ItemFilter:
    """GF-CF from the exact sparse sums, every stage timed."""
    gram = timed(
        stages,
        "sums (Gram, degrees)",
        lambda: gram_sum(bounded_rows(data.rows, 0.5, 1.0), dense=False),
    )
    degrees = item_sum(data.rows)
    stages["Gram non-zeros"] = int(gram.nnz)
    return timed(
        stages,
        f"normalise + eigsh k={k}",
        lambda: graph_filter(gram, degrees, 0.5, k, 1.0, data.num_items),
    )


BSPM_GOWALLA = {"k": 448, "alpha": 0.2, "sharpening_time": 2.5}
"""BSPM-EM's published Gowalla settings (Choi et al., SIGIR 2023; the authors' README):
``factor_dim`` 448, ``idl_beta`` 0.2, one RK4 sharpening step over ``T_s`` = 2.5."""


def bspm_scorer(data: RankingData, k: int, alpha: float, sharpening_time: float) -> Callable:
    r"""BSPM-EM as its authors' code computes it, from the exact Gram of ``data``'s rows
    (central, no DP): the blurred score :math:`r L` merged with the ideal low-pass
    :math:`\alpha\, r D^{-1/2} V_k V_k^\top D^{1/2}`, then sharpened with the whole
    :math:`L` by one RK4 step of :math:`ds/dt = -s L` over ``sharpening_time``: :math:`s\, p_T(L)`,
    :math:`p_T` the degree-4 Taylor polynomial of :math:`e^{-T x}`. Four products with
    the sparse :math:`L` per user (torch's, on every core): what the app's sharpening
    within the shipped basis avoids."""
    gram = gram_sum(bounded_rows(data.rows, 0.5, 1.0), dense=False)
    merged = graph_filter(gram, item_sum(data.rows), 0.5, k, alpha, data.num_items)
    linear = sp.csr_matrix(merged.linear, dtype=np.float32)
    whole = torch.sparse_csr_tensor(
        torch.from_numpy(linear.indptr.astype(np.int64)),
        torch.from_numpy(linear.indices.astype(np.int64)),
        torch.from_numpy(linear.data),
        size=linear.shape,
    )

    def scores(batch: np.ndarray) -> np.ndarray:
        term = torch.from_numpy(merged.scores(data.rows[batch]))
        sharpened = term.clone()
        for m in range(1, 5):  # term_m = s (-T L)^m / m!; L is symmetric
            term = (whole @ term.T).T * (-sharpening_time / m)
            sharpened += term
        return sharpened.numpy()

    return scores


def shipped_megabytes(item_filter: ItemFilter) -> dict[str, float]:
    """What a site downloads, as float32 values and int32 indices: the linear part (CSR:
    values, column indices, row pointers) and the low-pass basis with its two scalings."""
    linear = sp.csr_matrix(item_filter.linear)
    return {
        "linear part MB": (linear.nnz * 8 + (linear.shape[0] + 1) * 4) / 1e6,
        "low-pass basis MB": (item_filter.eigenvectors.size + 2 * len(item_filter.items)) * 4 / 1e6,
    }


def gowalla() -> dict:
    site = gowalla_site()
    tuning = ranking_data(site)
    results: dict = {"published LightGCN": PUBLISHED_GOWALLA}
    refit = ranking_data(site, refit=True)
    results["MostPop"] = {"test": evaluate(popularity_scores(item_sum(refit.rows)), refit, "test")}
    stages: dict = {}
    base = gf_cf_exact(tuning, 256, stages)
    values = []
    for setting, item_filter in graph_variants(base, (64, 128, 256), (0.05, 0.1, 0.2, 0.3, 1.0)):
        start = time.perf_counter()
        values.append((evaluate(filter_scores(item_filter, tuning), tuning, "val")[NDCG], setting))
        print("gowalla val", values[-1], f"{time.perf_counter() - start:.0f}s", flush=True)
    value, setting = max(values, key=lambda v: v[0])
    results["search (val NDCG@20)"] = [{**s, "val": v} for v, s in values]
    results["tuning stages (90% of train.txt)"] = stages

    data, stages = refit, {}
    fitted = gf_cf_exact(data, setting["k"], stages)
    if setting["alpha"] == "low-pass only":
        fitted = dataclasses.replace(fitted, linear=None)
    else:
        fitted = dataclasses.replace(fitted, alpha=setting["alpha"])
    test = timed(
        stages, "score all test users", lambda: evaluate(filter_scores(fitted, data), data, "test")
    )
    results["GF-CF, exact sparse sums"] = {
        "setting": setting,
        "val": value,
        "test": test,
        "stages": stages,
        "shipped": shipped_megabytes(fitted) if fitted.linear is not None else None,
    }
    print("gowalla exact", results["GF-CF, exact sparse sums"], flush=True)
    if fitted.linear is not None:
        sparsified = {}
        for count in (100, 200, 500, 1000):
            kept = dataclasses.replace(fitted, linear=keep_top_per_row(fitted.linear, count))
            sparsified[str(count)] = {
                "test": evaluate(filter_scores(kept, data), data, "test"),
                "shipped": shipped_megabytes(kept),
            }
            print("gowalla top-N", count, sparsified[str(count)], flush=True)
        results["linear part kept to top-N per row"] = sparsified
    return results


def gowalla_dp(seeds: int) -> dict:
    site = gowalla_site()
    data = ranking_data(site)
    users = validation_users(data)
    z = one_release(EPSILON, 1e-6)
    everyone = np.zeros(site.num_users, np.int64)
    results: dict = {"noise multiplier (one release)": z}
    refit = ranking_data(site, refit=True)
    mostpop = dp_mostpop(data, refit, everyone, z, seeds, (1.0, 3.0, 10.0), users)
    results["DP MostPop"] = mostpop
    print("gowalla-dp MostPop", mostpop["test"], flush=True)
    plans = [(0.1, 1000), (0.1, 2000), (0.1, 3000), (0.25, 2000)]
    grid = {"betas": (0.0, 0.25), "ks": (32, 64), "alphas": (1.0, 10.0), "ridges": (100,)}
    results["top-M dense Gram"] = dp_search(
        data, everyone, z, seeds, mostpop["degree bound"], plans, grid, refit, users
    )
    print("gowalla-dp", results["top-M dense Gram"]["setting"], results["top-M dense Gram"]["test"])
    return results


# -- MovieLens-100K ratings -----------------------------------------------------------


RATING_PRIOR = 3.0  # public: the middle of the 1-5 scale, the prior of every user's mean
SQRT2 = float(np.sqrt(2.0))


@dataclass(frozen=True)
class RatingSetting:
    """One configuration of the rating predictor; ``neighbours = 0`` is the bias model
    (user mean + item offset). ``exponent``/``bound`` bound the residual rows,
    ``co_count_shrinkage`` None: no co-rating weights released."""

    item_shrinkage: float
    user_shrinkage: float
    neighbours: int = 0
    exponent: float = 0.5
    bound: float = 1.0
    co_count_shrinkage: float | None = None
    damping: float = 0.5


@dataclass(frozen=True)
class RatingStatistics:
    """What the server sends the sites: item offsets, and for the neighbourhood
    predictor the residual covariance, co-rating weights and the diagonal floor."""

    item_offset: np.ndarray
    covariance: np.ndarray | None = None
    co_counts: np.ndarray | None = None
    diagonal_floor: float = 1e-12


def rmse(predicted: np.ndarray, part: Interactions) -> float:
    return float(np.sqrt(np.mean((np.clip(predicted, 1.0, 5.0) - part.rating) ** 2)))


def rating_statistics(
    train: Interactions,
    num_users: int,
    num_items: int,
    setting: RatingSetting,
    noise: tuple[float, ...] | None,
    rng: np.random.Generator,
) -> RatingStatistics:
    """Round 1: item sums and counts around each user's own mean (bound 1 under DP,
    sensitivity sqrt 2; noise multiplier ``noise[0]``); round 2: the residual covariance
    (``noise[1]``) and, with co-count shrinkage, the co-rating weights (``noise[2]``),
    each of sensitivity ``bound^2``. ``noise`` None: exact sums (no DP)."""
    zeros = np.zeros(num_items)
    first_means = user_means(train, num_users, zeros, RATING_PRIOR, setting.user_shrinkage)
    bound = np.inf if noise is None else 1.0
    sums, counts = item_offset_sums(train, num_users, num_items, first_means, bound)
    if noise is not None:
        released = release_vector(np.concatenate([sums, counts]), SQRT2, noise[0], rng)
        sums, counts = released[:num_items], released[num_items:]
    offsets = item_offsets(sums, counts, setting.item_shrinkage)
    if not setting.neighbours:
        return RatingStatistics(offsets)
    means = user_means(train, num_users, offsets, RATING_PRIOR, setting.user_shrinkage)
    residuals = residual_rows(train, num_users, num_items, means, offsets)
    covariance = gram_sum(bounded_rows(residuals, setting.exponent, setting.bound))
    co_counts = None
    if setting.co_count_shrinkage is not None:
        binary = user_rows(train, num_users, num_items)
        co_counts = gram_sum(bounded_rows(binary, setting.exponent, setting.bound))
    if noise is None:
        return RatingStatistics(offsets, covariance, co_counts)
    covariance = release_symmetric(covariance, setting.bound**2, noise[1], rng)
    if co_counts is not None:
        co_counts = release_symmetric(co_counts, setting.bound**2, noise[2], rng)
    return RatingStatistics(offsets, covariance, co_counts, 3 * noise[1] * setting.bound**2)


def rating_predictions(
    train: Interactions,
    num_users: int,
    num_items: int,
    setting: RatingSetting,
    released: RatingStatistics,
    part: Interactions,
) -> np.ndarray:
    """What each site predicts for its users' pairs in ``part``, from its users' own
    training ratings and the released statistics."""
    offsets = released.item_offset
    means = user_means(train, num_users, offsets, RATING_PRIOR, setting.user_shrinkage)
    predicted = means[part.user] + offsets[part.item]
    if setting.neighbours:
        residuals = residual_rows(train, num_users, num_items, means, offsets)
        similarity = covariance_similarity(
            released.covariance,
            released.co_counts,
            setting.co_count_shrinkage or 0.0,
            released.diagonal_floor,
        )
        predicted += neighbourhood_residuals(
            similarity, residuals, part.user, part.item, setting.neighbours, setting.damping
        )
    return predicted


def neighbourhood_settings(bias: RatingSetting, dp: bool) -> Iterator[RatingSetting]:
    """The neighbourhood predictor's grid on top of the chosen bias shrinkages."""
    scalings = [(0.5, 1.0)] + ([(0.0, 2.0), (0.0, 4.0)] if dp else [(0.0, np.inf)])
    dampings = (0.5, 2.0, 10.0, 50.0) if dp else (0.1, 0.5, 2.0)
    for (exponent, bound), neighbours, damping in itertools.product(
        scalings, (20, 40, 80), dampings
    ):
        unit = 0.01 if exponent == 0.5 else 1.0
        for shrinkage in (None, *(unit * s for s in (1.0, 10.0, 100.0))):
            yield dataclasses.replace(
                bias,
                neighbours=neighbours,
                exponent=exponent,
                bound=bound,
                co_count_shrinkage=shrinkage,
                damping=damping,
            )


def movielens_rating(seeds: int) -> dict:
    site = load_site(data_config("ml-100k", split="u1"), 0, 1)
    users, items = site.num_users, site.catalogue.num_items
    full = Interactions.concat([site.train, site.val])  # all of u1.base
    z = one_release(EPSILON, 1e-5)
    results: dict = {"noise multiplier (one release)": z}
    results["global mean"] = {"test": rmse(np.full(len(site.test), full.rating.mean()), site.test)}
    released: dict = {}

    def val_rmse(setting: RatingSetting, noise: tuple | None, seed: int) -> float:
        # The statistics do not depend on the neighbourhood's size, damping or shrinkage.
        key = (
            dataclasses.replace(
                setting,
                neighbours=min(setting.neighbours, 1),
                damping=0.0,
                co_count_shrinkage=None if setting.co_count_shrinkage is None else 0.0,
            ),
            noise,
            seed,
        )
        if key not in released:
            released[key] = rating_statistics(
                site.train, users, items, setting, noise, np.random.default_rng(seed)
            )
        predicted = rating_predictions(site.train, users, items, setting, released[key], site.val)
        return rmse(predicted, site.val)

    def test_rmse(setting: RatingSetting, noise: tuple | None, seed: int) -> float:
        stats = rating_statistics(full, users, items, setting, noise, test_rng(seed))
        return rmse(rating_predictions(full, users, items, setting, stats, site.test), site.test)

    def search(candidates, noise_of, draws: int) -> tuple[float, RatingSetting]:
        """The candidate of best mean validation RMSE over ``draws`` noise draws."""
        released.clear()
        scored = [
            (statistics.mean(val_rmse(c, noise_of(c), s) for s in range(draws)), c)
            for c in candidates
        ]
        return min(scored, key=lambda t: t[0])

    def report(setting: RatingSetting, value: float, noise: tuple | None, draws: int) -> dict:
        tests = [test_rmse(setting, noise, s) for s in range(draws)]
        return {
            "setting": dataclasses.asdict(setting),
            "val": value,
            "noise multipliers": None if noise is None else list(noise),
            "test": tests[0] if noise is None else spread(tests),
        }

    shrinkages = [
        RatingSetting(i, u) for i in (0.3, 1.0, 3.0, 10.0, 30.0) for u in (1.0, 5.0, 20.0)
    ]
    value, bias = search(shrinkages, lambda _: None, 1)
    results["user mean + item offset"] = report(bias, value, None, 1)
    value, best = search(neighbourhood_settings(bias, dp=False), lambda _: None, 1)
    results["item graph (residual covariance kNN)"] = report(best, value, None, 1)
    print("rating no DP", results["item graph (residual covariance kNN)"], flush=True)

    # Epsilon 8, noise once on the sum.
    value, dp_bias = search(shrinkages, lambda _: (z,), seeds)
    results["DP user mean + item offset (item statistics released)"] = report(
        dp_bias, value, (z,), seeds
    )
    by_share = {}
    for share in (0.25, 0.5, 0.75, 0.9, 0.95):

        def noise_of(setting: RatingSetting, share: float = share) -> tuple:
            if setting.co_count_shrinkage is None:
                return tuple(split_noise_multiplier(z, [share, 1 - share]))
            return tuple(split_noise_multiplier(z, [share, (1 - share) / 2, (1 - share) / 2]))

        value, setting = search(neighbourhood_settings(dp_bias, dp=True), noise_of, seeds)
        by_share[share] = (value, setting, noise_of(setting))
        print("rating DP, item statistics share", share, value, setting, flush=True)
    share = min(by_share, key=lambda s: by_share[s][0])
    value, setting, noise = by_share[share]
    results["DP item graph (residual covariance kNN)"] = report(setting, value, noise, seeds) | {
        "item statistics share": share,
        "val by item statistics share": {str(s): v[0] for s, v in by_share.items()},
    }
    print("rating DP", results["DP item graph (residual covariance kNN)"], flush=True)
    return results


# -- results --------------------------------------------------------------------------


def figure_of(results: dict) -> Figure:
    """One panel per case that has run: the test metric of each method (DP: mean and
    spread over noise draws), the reference as a dashed line."""
    panels = [case for case in CASES if case in results]
    figure = Figure(figsize=(3.6 * max(len(panels), 1), 4.2))
    axes = figure.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for axis, case in zip(axes, panels, strict=False):
        metric, bars, reference = panel_of(case, results[case])
        axis.bar(
            range(len(bars)),
            [mean for _, mean, _ in bars],
            yerr=[error for _, _, error in bars],
            color="grey",
        )
        axis.set_xticks(range(len(bars)), [name for name, _, _ in bars], rotation=60, ha="right")
        axis.tick_params(axis="x", labelsize=7)
        if reference is not None:
            axis.axhline(reference[1], color="k", linestyle="--", label=reference[0])
            axis.legend(fontsize=7)
        axis.set(title=case, ylabel=f"test {metric}")
        if metric == "RMSE":
            axis.set_ylim(0.85, None)
    return figure


def panel_of(case: str, result: dict) -> tuple[str, list, tuple[str, float] | None]:
    """(metric, [(label, mean, spread)], reference line) of one case's panel."""

    def bar(label: str, test: dict | float, metric: str) -> tuple[str, float, float]:
        entry = test[metric] if isinstance(test, dict) and metric in test else test
        if isinstance(entry, dict):
            return label, entry["mean"], entry["spread"]
        return label, float(entry), 0.0

    if case == "ml-ranking":
        names = ("MostPop", "GF-CF (eta = beta = 1/2)", "graph filter", "EASE")
        bars = [bar(name, result[name]["test"], NDCG) for name in names if name in result]
        return NDCG, bars, ("LightGCN, same split", LIGHTGCN_ML100K[NDCG])
    if case == "ml-dp":
        bars = []
        for name, sub in result.items():
            if isinstance(sub, dict) and "item graph" in sub:
                short = name.split(")")[0] + ")"
                bars.append(bar(f"{short} DP MostPop", sub["DP MostPop"]["test"], NDCG))
                bars.append(bar(f"{short} item graph", sub["item graph"]["test"], NDCG))
        return f"{NDCG} (epsilon 8)", bars, None
    if case == "gowalla":
        bars = [
            bar("MostPop", result["MostPop"]["test"], RECALL),
            bar("GF-CF exact", result["GF-CF, exact sparse sums"]["test"], RECALL),
        ]
        for count, sub in result.get("linear part kept to top-N per row", {}).items():
            bars.append(bar(f"top-{count} per row", sub["test"], RECALL))
        return RECALL, bars, ("published LightGCN", PUBLISHED_GOWALLA[RECALL])
    if case == "gowalla-dp":
        names = [name for name in result if isinstance(result[name], dict)]
        return f"{RECALL} (epsilon 8)", [bar(n, result[n]["test"], RECALL) for n in names], None
    names = [name for name in result if isinstance(result[name], dict)]
    return "RMSE", [bar(n, result[n]["test"], "rmse") for n in names], None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"some of {', '.join(CASES)}")
    parser.add_argument("--seeds", type=int, default=2, help="noise draws under DP")
    parser.add_argument("--plot", action="store_true", help="only redraw the saved results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    path = RESULTS / "item_graph_search.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    generated = results.pop("generated", None)
    if args.plot:
        figure = figure_of(results)
        figure.tight_layout()
        figure.savefig(path.with_suffix(".png"), dpi=110)
        print(path.with_suffix(".png"), "from results generated", generated)
        return
    run = {
        "ml-ranking": movielens_ranking,
        "ml-dp": lambda: movielens_dp(args.seeds),
        "gowalla": gowalla,
        "gowalla-dp": lambda: gowalla_dp(args.seeds),
        "ml-rating": lambda: movielens_rating(args.seeds),
    }
    for case in args.cases.split(","):
        start = time.perf_counter()
        results[case] = run[case]()
        results[case]["seconds"] = time.perf_counter() - start
        print(json.dumps(results[case], default=str)[:3000], flush=True)
        print(write_results("item_graph_search", results, figure_of(results)), flush=True)


if __name__ == "__main__":
    main()
