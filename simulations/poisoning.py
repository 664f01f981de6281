"""Poisoning the federation: one malicious site of ten against the default pipeline.

Site 0 of 10 is malicious and tries to push a cold target item (the first catalogue
item with exactly ``TARGET_INTERACTIONS`` training interactions) into honest users'
top-K. It runs these attacks, through a ClientApp mod around the honest site code, so
everything else is the real federation (Flower's simulation engine):

- ``fake-users``: the site adds fake users up to the public ``max-users-per-site``, each
  with the target and the site's ``POPULAR`` most popular items (the strongest thing a
  site that looks honest can do: fake users are users);
- ``scaled``: the same fake users, and the site multiplies its sums (statistics rounds)
  and its item-side update, counts and user count (training rounds) by ``FACTOR``;
- ``crafted``: honest data, but in training rounds the site replaces its update of the
  target's item row (PipAttack-style, Zhang et al., WSDM 2022): its bias raised by
  ``BOOST`` and its embedding moved by ``BOOST`` along the popular items' mean
  embedding, with the largest interaction count its users can have.

Each attack runs with the defences (the default: statistics checks, count bounds and
the coordinate-wise median of the item side) and without them (the checks switched off
and the count-weighted mean, by patching the server in this process). Reported: the
exposure ratio ER@K, the share of honest users (the other nine sites' users who have
not trained on the target) whose top-K holds the target, and the clean runs' NDCG@20
(validation and test, every user), so that what the defences cost is visible. On
Gowalla (10 minutes a run) the two runs that no target needs, fake users and scaling
without the defences, are left out.
``--cases aggregation`` compares the mean, the median and the trimmed mean on
validation for each pipeline that trains an item side without secure aggregation
(the default's choice).

    python -m simulations.poisoning --datasets ml-100k gowalla
    python -m simulations.poisoning --cases aggregation --datasets ml-100k gowalla
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable
from matplotlib.figure import Figure

import client.site_round
import server.item_graph
from client.app import make_app
from client.secure_aggregation import secure_aggregation_mod
from common.config import RunConfig
from common.data import SiteData, load_site
from common.data.dataset import Interactions
from common.data.keys import stable_key
from common.graph.release import gram_bounds
from common.model import ITEM_ROW_PARAMETERS
from common.protocol import ARRAYS, ITEM_COUNTS, METRICS, NUM_EXAMPLES, STATISTICS
from server.item_graph import GraphRelease
from server.strategy import ItemSideFedAvg
from simulations.harness import (
    MOVIELENS_IMPLICIT,
    RESULTS,
    data_config,
    federate,
    kept_metrics,
    write_results,
)

SITES, MALICIOUS, K = 10, 0, 20
TARGET_INTERACTIONS = 2
POPULAR, FACTOR, BOOST = 20, 10.0, 100.0
ATTACKS = ("none", "fake-users", "scaled", "crafted")
ILLUSTRATIVE = {("fake-users", False), ("scaled", False)}
"""Runs no target needs (fake users and scaling without the defences): MovieLens only."""
EXPOSED_USERS = 5000
LOAD_SITE = client.site_round.load_site
"""The honest loader, which the malicious site's mod wraps while it handles a message."""


@dataclasses.dataclass(frozen=True)
class Attack:
    """What the malicious site does (module docstring): ``kind`` in :data:`ATTACKS`,
    the ``target`` item, ``fake_users`` fake users with the ``popular`` items."""

    kind: str
    target: int
    fake_users: int = 0
    popular: tuple[int, ...] = ()


def with_fake_users(attack: Attack, config: RunConfig, site_id: int, sites: int) -> SiteData:
    """The site's data, and for the malicious site ``attack.fake_users`` fake users, each
    with the target and the popular items (training interactions only)."""
    site = LOAD_SITE(config, site_id, sites)
    if site_id != MALICIOUS or not attack.fake_users:
        return site
    items = np.array([attack.target, *attack.popular])
    fake = np.repeat(np.arange(attack.fake_users) + site.num_users, len(items))
    train = site.train
    added = Interactions(
        np.concatenate([train.user, fake]),
        np.concatenate([train.item, np.tile(items, attack.fake_users)]),
        np.concatenate([train.rating, np.ones(len(fake))]),
    )
    keys = [stable_key(f"fake user {k}") for k in range(attack.fake_users)]
    features = np.repeat(site.user_features[:1] * 0, attack.fake_users, axis=0)
    return dataclasses.replace(
        site,
        user_keys=np.concatenate([site.user_keys, np.array(keys, np.int64)]),
        user_features=np.concatenate([site.user_features, features]),
        train=added,
    )


def attack_mod(attack: Attack):
    """A ClientApp mod: the malicious site's messages are handled on its poisoned data,
    and its replies changed as ``attack`` says; other sites pass through."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if int(context.node_config["partition-id"]) != MALICIOUS or attack.kind == "none":
            return call_next(msg, context)
        client.site_round.load_site = functools.partial(with_fake_users, attack)
        try:
            reply = call_next(msg, context)
        finally:
            client.site_round.load_site = LOAD_SITE
        if reply.has_error() or ARRAYS not in reply.content.array_records:
            return reply
        sent = {k: v.numpy() for k, v in reply.content.array_records[ARRAYS].items()}
        metrics = dict(reply.content.metric_records[METRICS])
        if STATISTICS in sent:
            if attack.kind == "scaled":
                sent[STATISTICS] = sent[STATISTICS] * FACTOR
        elif attack.kind == "scaled":
            current = {k: v.numpy() for k, v in msg.content[ARRAYS].items()}
            for key, value in current.items():
                sent[key] = (value + FACTOR * (sent[key] - value)).astype(value.dtype)
            if ITEM_COUNTS in sent:
                sent[ITEM_COUNTS] = sent[ITEM_COUNTS] * FACTOR
                metrics[NUM_EXAMPLES] = metrics[NUM_EXAMPLES] * FACTOR
        elif attack.kind == "crafted":
            sent = crafted(sent, attack, metrics.get(NUM_EXAMPLES, 1.0))
        reply.content.array_records[ARRAYS] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in sent.items()}
        )
        reply.content.metric_records[METRICS] = MetricRecord(metrics)
        return reply

    return mod


def crafted(sent: dict[str, np.ndarray], attack: Attack, users: float) -> dict[str, np.ndarray]:
    """The site's update with the target's item row promoted (module docstring)."""
    bias, embedding = ITEM_ROW_PARAMETERS[1], ITEM_ROW_PARAMETERS[0]
    popular = sent[embedding][list(attack.popular)].mean(0)
    sent[bias][attack.target] += BOOST
    sent[embedding][attack.target] += BOOST * popular / max(np.linalg.norm(popular), 1e-12)
    if ITEM_COUNTS in sent:
        sent[ITEM_COUNTS][attack.target] = users
    return sent


@contextlib.contextmanager
def undefended() -> Iterator[None]:
    """The server in this process without its checks: every statistics norm, trace and
    count accepted, and the count-weighted mean instead of the median."""
    saved = (
        GraphRelease.largest_norm,
        GraphRelease.largest_traces,
        ItemSideFedAvg.check_counts,
        server.item_graph.check_exact,
    )
    GraphRelease.largest_norm = lambda self, server_round, n: np.inf
    GraphRelease.largest_traces = lambda self: (
        [np.inf] * len(gram_bounds(self.config, self.catalogue.num_items))
    )
    ItemSideFedAvg.check_counts = lambda self, counts, users: None
    server.item_graph.check_exact = lambda config, server_round, vector, traces: None
    try:
        yield
    finally:
        (
            GraphRelease.largest_norm,
            GraphRelease.largest_traces,
            ItemSideFedAvg.check_counts,
            server.item_graph.check_exact,
        ) = saved


def the_attacks(config: RunConfig) -> tuple[Attack, dict[str, Any]]:
    """The target, the popular items and the fake users the malicious site can add."""
    everyone = load_site(config, 0, 1)
    counts = np.bincount(everyone.train.item, minlength=everyone.catalogue.num_items)
    target = int(np.flatnonzero(counts == TARGET_INTERACTIONS)[0])
    site = load_site(config, MALICIOUS, SITES)
    own = np.bincount(site.train.item, minlength=everyone.catalogue.num_items)
    popular = tuple(int(i) for i in np.argsort(-own, kind="stable")[:POPULAR])
    fake_users = config.max_users_per_site - site.num_users
    about = {
        "target": target,
        "target-training-interactions": TARGET_INTERACTIONS,
        "malicious-site-users": site.num_users,
        "max-users-per-site": config.max_users_per_site,
        "fake-users": fake_users,
    }
    return Attack("none", target, fake_users, popular), about


def exposure(config: RunConfig, run_dir, attack: Attack, last_round: bool) -> dict[str, float]:
    """ER@10 and ER@20 of the target over the honest users who have not trained on it (at
    most ``EXPOSED_USERS`` of them, drawn at random: a share to within about 0.01)."""
    everyone = load_site(config, 0, 1)
    malicious = set(load_site(config, MALICIOUS, SITES).user_keys.tolist())
    trained = np.zeros(everyone.num_users, bool)
    trained[everyone.train.user[everyone.train.item == attack.target]] = True
    honest = np.flatnonzero(~np.isin(everyone.user_keys, list(malicious)) & ~trained)
    if len(honest) > EXPOSED_USERS:
        rng = np.random.default_rng(config.seed)
        honest = np.sort(rng.choice(honest, EXPOSED_USERS, replace=False))
    target = np.full(len(honest), attack.target)
    heldout = Interactions(honest, target, np.ones(len(honest)))
    return {
        f"er@{k}": kept_metrics(config, run_dir, everyone, heldout, k, last_round=last_round)[
            f"recall@{k}"
        ]
        for k in (10, 20)
    }


def attacked(config: RunConfig, attack: Attack, defended: bool) -> dict[str, Any]:
    """One federation with ``attack``: ER@K of honest users for the model the run kept (its
    best validation round, what users get) and for its last round (what the attack did to
    training), and the kept model's val/test NDCG@20 over every user."""
    start = time.perf_counter()
    app = make_app(mods=(attack_mod(attack), secure_aggregation_mod))
    if defended:
        run_dir = federate(config, SITES, app=app)
    else:
        with undefended():
            run_dir = federate(config.replace(item_side_aggregation="mean"), SITES, app=app)
    everyone = load_site(config, 0, 1)
    result: dict[str, Any] = {"rejected": rejections(run_dir), "kept-round": kept_round(run_dir)}
    result["kept"] = {
        "exposure": exposure(config, run_dir, attack, last_round=False),
        "val": kept_metrics(config, run_dir, everyone, everyone.val, K),
        "test": kept_metrics(config, run_dir, everyone, everyone.test, K, everyone.val),
    }
    result["last round"] = {"exposure": exposure(config, run_dir, attack, last_round=True)}
    result["seconds"] = time.perf_counter() - start
    print(attack.kind, "defended" if defended else "undefended", result, flush=True)
    return result


def kept_round(run_dir) -> int | None:
    """The round whose model the run kept (``best-model.pt``), from its status."""
    return json.loads((run_dir / "status.json").read_text()).get("best-round")


def validation_by_round(run_dir) -> dict[str, float]:
    """The run's federated validation metric (NDCG@20 or RMSE, the one rounds are kept by)
    of every evaluated round, from its ``metrics.json``."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        r: value
        for r, record in metrics.items()
        for key, value in (record.get("aggregated") or {}).items()
        if key in (f"val-ndcg@{K}", "val-rmse")
    }


def rejections(run_dir) -> list[str]:
    """Every rejection the run's round book recorded, as ``round r, site s: reason``."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return [
        f"round {r}, {site}: {reason}"
        for r, record in metrics.items()
        for site, reason in (record.get("rejected") or {}).items()
    ]


def poisoning(dataset: str, results: dict[str, Any]) -> None:
    """Every attack with and without the defences on ``dataset``, without DP (where the
    default pipeline trains an item side), into ``results[dataset]``, written after each
    run (a Gowalla run takes about 10 minutes)."""
    if dataset == "ml-100k":
        config = data_config("ml-100k", **MOVIELENS_IMPLICIT, dp=False, min_sites=SITES)
        bound = 200  # about twice a site's users (94): a public bound a federation would set
    else:
        config = data_config("gowalla", task="ranking", dp=False, min_sites=SITES)
        bound = 6000  # about twice a site's users (2,986)
    config = config.replace(max_users_per_site=bound)
    honest, about = the_attacks(config)
    rows: dict[str, Any] = {}
    results[dataset] = {"setting": about | {"item-graph": config.item_graph}, "runs": rows}
    for kind in ATTACKS:
        attack = dataclasses.replace(honest, kind=kind)
        if kind in ("none", "crafted"):
            attack = dataclasses.replace(attack, fake_users=0)
        for defended in (True, False):
            if dataset != "ml-100k" and (kind, defended) in ILLUSTRATIVE:
                continue
            rows[f"{kind}, {'defended' if defended else 'undefended'}"] = attacked(
                config, attack, defended
            )
            print(write_results("poisoning", results, figure_of(results)), flush=True)


def aggregation_choice(datasets: list[str], results: dict[str, Any]) -> None:
    """Validation metrics of the mean, the median and the trimmed mean of the item side,
    for each pipeline that trains one without secure aggregation, into
    ``results["aggregation"]``: on MovieLens-100K implicit and u1 ratings without DP and
    u1 ratings at epsilon 8 with per-site noise (ranking under DP trains nothing by
    default); on Gowalla without DP."""
    settings = {
        "ml-100k": {
            "MovieLens-100K implicit, no DP": data_config(
                "ml-100k", **MOVIELENS_IMPLICIT, dp=False, min_sites=SITES
            ),
            "MovieLens-100K u1 ratings, no DP": data_config(
                "ml-100k", split="u1", dp=False, min_sites=SITES
            ),
            "MovieLens-100K u1 ratings, epsilon 8, per-site noise": data_config(
                "ml-100k", split="u1", target_epsilon=8.0, delta=1e-5, min_sites=SITES
            ),
        },
        "gowalla": {
            "Gowalla, no DP": data_config("gowalla", task="ranking", dp=False, min_sites=SITES)
        },
    }
    rows = results.setdefault("aggregation", {})
    for dataset in datasets:
        for name, config in settings[dataset].items():
            everyone = load_site(config, 0, 1)
            for aggregation in ("mean", "median", "trimmed-mean"):
                run_dir = federate(config.replace(item_side_aggregation=aggregation), SITES)
                rows[f"{name}, {aggregation}"] = {
                    "val": kept_metrics(config, run_dir, everyone, everyone.val, K),
                    "kept-round": kept_round(run_dir),
                    "val by round": validation_by_round(run_dir),
                    "item-graph": config.item_graph,
                }
                print(name, aggregation, rows[f"{name}, {aggregation}"], flush=True)
                print(write_results("poisoning", results, figure_of(results)), flush=True)


def figure_of(results: dict[str, Any]) -> Figure | None:
    datasets = [d for d in ("ml-100k", "gowalla") if d in results]
    if not datasets:
        return None
    figure = Figure(figsize=(6 * len(datasets), 4))
    panels = figure.subplots(1, len(datasets), squeeze=False)[0]
    for axes, dataset in zip(panels, datasets, strict=True):
        runs = results[dataset]["runs"]
        for offset, defended in ((-0.2, "defended"), (0.2, "undefended")):
            values = [
                runs[f"{kind}, {defended}"]["last round"]["exposure"]["er@10"]
                if f"{kind}, {defended}" in runs
                else np.nan  # not run (yet)
                for kind in ATTACKS
            ]
            axes.bar(np.arange(len(ATTACKS)) + offset, values, 0.4, label=defended)
        axes.set_xticks(range(len(ATTACKS)), ATTACKS)
        axes.set(
            title=f"{dataset}: one malicious site of 10",
            ylabel="ER@10 of honest users (last round)",
        )
        axes.legend()
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", nargs="+", choices=("attacks", "aggregation"), default=["attacks"]
    )
    parser.add_argument(
        "--datasets", nargs="+", choices=("ml-100k", "gowalla"), default=["ml-100k"]
    )
    args = parser.parse_args()
    path = RESULTS / "poisoning.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.pop("generated", None)
    if "attacks" in args.cases:  # runs of another version must not mix with these
        for dataset in args.datasets:
            results.pop(dataset, None)
    if "aggregation" in args.cases:
        aggregation_choice(args.datasets, results)
    if "attacks" in args.cases:
        for dataset in args.datasets:
            poisoning(dataset, results)


if __name__ == "__main__":
    main()
