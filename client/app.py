"""The Flower ClientApp: one site.

It reads the run configuration from the server's message, loads the site's
own users (``node_config``: ``data-path`` in deployment, ``partition-id`` and
``num-partitions`` in simulation), trains or evaluates, and replies with the
item side only. Before a reply leaves, every key in it is checked against the
release inventory (``common.privacy.released_quantities``).

The site keeps its own privacy ledger and private user embeddings on its disk
(``client.site_state``). Before training it checks that the round would keep
it within ``max-epsilon``; if not, it declines and says so. After training it
records the round in the ledger, then replies.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site_state import SiteState
from client.train import site_graphs, site_model, train_locally
from common.config import RunConfig
from common.data import SiteData, load_site
from common.data.site_folder import load_site_folder
from common.errors import InputError
from common.evaluation import evaluate as evaluate_model
from common.model import EgoGraphRecommender
from common.privacy import (
    CATALOGUE_FINGERPRINT,
    ITEM_COUNTS,
    History,
    LedgerEntry,
    epsilon_spent,
    independent_epsilon,
    noise_multiplier_for,
    site_delta,
    undeclared_releases,
)

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, server_round, run_name = read_config(msg)
    site, state = load_site_from(context, msg, config)
    model = load_global_model(msg, site, config)
    delta = site_delta(config, site.num_users)
    sigma = noise_multiplier_for(config, delta) if config.dp else 0.0
    round_steps = (sigma, config.sampling_probability, config.local_epochs * config.steps_per_epoch)
    ledger, history = state.ledger(), state.history()
    unbounded = not config.dp or any(e.without_noise for e in ledger)
    metrics: dict[str, float | int] = {"site-id": site.site_id}

    if (
        config.dp
        and config.max_epsilon > 0
        and (
            unbounded
            or epsilon_spent(config.accountant, [*history, round_steps], delta) > config.max_epsilon
        )
    ):
        declined = ledger_entry(config, run_name, server_round, round_steps, delta, history,
                                trained=False, unbounded=unbounded)  # fmt: skip
        state.record(declined)
        return reply(msg, config, "train", model, {}, metrics | declined.metrics())

    private = (
        state.private_embeddings(site.user_keys, config.embedding_dim)
        if config.private_user_embedding
        else None
    )
    result = train_locally(
        model,
        site_graphs(site, config),
        config.replace(noise_multiplier=sigma) if config.dp else config,
        server_round,
        history,
        select_device(config.device),
        private,
    )
    entry = ledger_entry(config, run_name, server_round, round_steps, delta, result.history,
                         trained=True, unbounded=unbounded)  # fmt: skip
    state.record(entry)  # before the reply leaves: spent budget is never lost
    if private is not None:
        state.save_private_embeddings(site.user_keys, private)

    arrays = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if config.dp:
        metrics |= entry.metrics()
    else:
        counts = np.bincount(site.train.item, minlength=site.catalogue.num_items)
        arrays[ITEM_COUNTS] = torch.as_tensor(counts.astype(np.float32))
        metrics |= {"num-examples": site.num_users, "train-loss": result.mean_loss}
    return reply(msg, config, "train", model, arrays, metrics)


def ledger_entry(
    config: RunConfig,
    run_name: str,
    server_round: int,
    round_steps: tuple[float, float, int],
    delta: float,
    history: History,
    trained: bool,
    unbounded: bool,
) -> LedgerEntry:
    """The ledger entry of a round; its epsilon covers ``history`` (all DP rounds so far).

    ``unbounded``: some round of this site trained without noise, so no epsilon
    bounds what its users revealed.
    """
    sigma, rate, steps = round_steps
    spent, check = (
        (math.inf, math.inf)
        if unbounded
        else (
            epsilon_spent(config.accountant, history, delta),
            independent_epsilon(config.accountant, history, delta),
        )
    )
    return LedgerEntry(
        run=run_name, round=server_round, trained=trained, noise_multiplier=sigma,
        sample_rate=rate, steps=steps if trained else 0, clip_norm=config.clip_norm,
        delta=delta, accountant=config.accountant, epsilon=spent, independent_epsilon=check,
    )  # fmt: skip


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config, _, _ = read_config(msg)
    site, state = load_site_from(context, msg, config)
    model = load_global_model(msg, site, config).to(select_device(config.device))
    private = (
        state.private_embeddings(site.user_keys, config.embedding_dim)
        if config.private_user_embedding
        else None
    )
    graphs = site_graphs(site, config)
    device = next(model.parameters()).device
    metrics: dict[str, float | int] = {"site-id": site.site_id}
    for part, heldout, exclude in (("val", site.val, None), ("test", site.test, site.val)):
        values = evaluate_model(model, graphs, heldout, config.top_k, exclude, device, private)
        metrics |= {f"{part}-{name}": value for name, value in values.items()}
    if len(site.cold_items):
        cold = partial(evaluate_model, model, graphs, site.cold, config.top_k, None, device,
                       private, site.cold_items)  # fmt: skip
        metrics |= {f"cold-{name}": value for name, value in cold().items()}
        if model.item_text_projection is not None:
            with model.text_disabled():
                metrics |= {f"cold-{name}-without-text": value for name, value in cold().items()}
    if not config.dp:
        metrics["num-examples"] = site.num_users
    return reply(msg, config, "evaluate", model, {}, metrics)


def read_config(msg: Message) -> tuple[RunConfig, int, str]:
    """The run configuration, the server round and the run's name from a message."""
    values = dict(msg.content["config"])
    server_round = int(values.pop("server-round"))
    run_name = str(values.pop("run-name"))
    values.pop(CATALOGUE_FINGERPRINT)
    return RunConfig.from_mapping(values), server_round, run_name


def load_site_from(context: Context, msg: Message, config: RunConfig) -> tuple[SiteData, SiteState]:
    """This node's site and its state folder.

    Deployment: ``node_config["data-path"]`` is the site's data folder
    (``common.data.site_folder``), state under ``<data-path>/state``.
    Simulation: site ``partition-id`` of ``num-partitions`` of the configured
    dataset, state under ``site-state-dir``. Either way the site's catalogue
    must be the one the server built the model for.
    """
    node = context.node_config
    if "data-path" in node:
        folder = Path(str(node["data-path"])).expanduser()
        site, state = load_site_folder(folder), SiteState(folder / "state")
    elif "partition-id" in node and "num-partitions" in node:
        site = load_site(config, int(node["partition-id"]), int(node["num-partitions"]))
        state = SiteState.in_simulation(config, site)
    else:
        raise InputError(
            "node_config: expected data-path (deployment: --node-config "
            "'data-path=\"/srv/site\"') or partition-id and num-partitions (simulation)"
        )
    expected = str(msg.content["config"][CATALOGUE_FINGERPRINT])
    if site.catalogue.fingerprint() != expected:
        where = node.get("data-path", "the configured dataset")
        raise InputError(
            f"{where}: the site's item catalogue differs from the server's (fingerprint "
            f"{site.catalogue.fingerprint()[:12]} vs {expected[:12]}); every site needs the "
            "catalogue the coordinator published"
        )
    return site, state


def load_global_model(msg: Message, site: SiteData, config: RunConfig) -> EgoGraphRecommender:
    """The global item side from the message, with the catalogue's text vectors."""
    model = site_model(site.catalogue, config, select_device(config.device))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


def select_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def reply(
    msg: Message,
    config: RunConfig,
    message_type: str,
    model: EgoGraphRecommender,
    arrays: dict[str, torch.Tensor],
    metrics: dict[str, float | int],
) -> Message:
    """The reply, after checking every key against the release inventory."""
    undeclared = undeclared_releases(
        config, message_type, arrays, metrics, model.state_dict().keys()
    )
    if undeclared:
        raise RuntimeError(
            f"refusing to send values missing from the release inventory: {undeclared}"
        )
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays:
        content["arrays"] = ArrayRecord(arrays)
    return Message(content=content, reply_to=msg)
