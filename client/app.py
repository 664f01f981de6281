"""The Flower ClientApp: one site.

It reads the run configuration from the server's message, loads the site's own
users (``node_config``: ``partition-id`` and ``num-partitions`` in simulation),
trains or evaluates, and replies with the item side only. Before a reply leaves,
every key in it is checked against the release inventory
(``common.privacy.released_quantities``). The site's accountant history and its
private user embeddings stay in ``context.state``, which Flower never sends.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.train import site_graphs, train_locally
from common.config import RunConfig
from common.data import SiteData, load_site
from common.errors import InputError
from common.evaluation import evaluate as evaluate_model
from common.model import EgoGraphRecommender, build_model
from common.privacy import ITEM_COUNTS, History, undeclared_releases

app = ClientApp()

PRIVATE_EMBEDDINGS = "private-user-embeddings"
"""Key of the private embedding table in ``context.state`` (never sent)."""


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, server_round = read_config(msg)
    site = load_site_from(context, config)
    model = load_global_model(msg, site, config)
    device = select_device(config.device)
    private = read_private_embeddings(context, site, config)
    result = train_locally(
        model,
        site_graphs(site, config),
        config,
        server_round,
        read_history(context),
        device,
        private,
    )
    context.state["privacy"] = ConfigRecord({"history": json.dumps(result.history)})
    if private is not None:
        context.state[PRIVATE_EMBEDDINGS] = ArrayRecord({"embedding": private})
    arrays = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    metrics: dict[str, float | int] = {"site-id": site.site_id}
    if config.dp:
        metrics["epsilon"] = result.epsilon
    else:
        counts = np.bincount(site.train.item, minlength=site.catalogue.num_items)
        arrays[ITEM_COUNTS] = torch.as_tensor(counts.astype(np.float32))
        metrics |= {"num-examples": site.num_users, "train-loss": result.mean_loss}
    return reply(msg, config, "train", model, arrays, metrics)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config, _ = read_config(msg)
    site = load_site_from(context, config)
    model = load_global_model(msg, site, config).to(select_device(config.device))
    graphs = site_graphs(site, config)
    metrics: dict[str, float | int] = {"site-id": site.site_id}
    private = read_private_embeddings(context, site, config)
    device = next(model.parameters()).device
    for part, heldout, exclude in (("val", site.val, None), ("test", site.test, site.val)):
        values = evaluate_model(model, graphs, heldout, config.top_k, exclude, device, private)
        metrics |= {f"{part}-{name}": value for name, value in values.items()}
    if not config.dp:
        metrics["num-examples"] = site.num_users
    return reply(msg, config, "evaluate", model, {}, metrics)


def read_config(msg: Message) -> tuple[RunConfig, int]:
    values = dict(msg.content["config"])
    server_round = int(values.pop("server-round"))
    return RunConfig.from_mapping(values), server_round


def load_site_from(context: Context, config: RunConfig) -> SiteData:
    """This node's site: ``partition-id`` of ``num-partitions`` in ``node_config``."""
    for key in ("partition-id", "num-partitions"):
        if key not in context.node_config:
            raise InputError(
                f"node_config has no '{key}'; start the SuperNode with "
                "--node-config 'partition-id=0 num-partitions=N'"
            )
    return load_site(
        config, int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    )


def load_global_model(msg: Message, site: SiteData, config: RunConfig) -> EgoGraphRecommender:
    model = build_model(site.catalogue, config)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


def select_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def read_history(context: Context) -> History:
    record = context.state.config_records.get("privacy")
    return [] if record is None else [tuple(s) for s in json.loads(str(record["history"]))]


def read_private_embeddings(
    context: Context, site: SiteData, config: RunConfig
) -> torch.Tensor | None:
    """The site's private user embeddings (zeros at first), or None when not configured."""
    if not config.private_user_embedding:
        return None
    record = context.state.array_records.get(PRIVATE_EMBEDDINGS)
    if record is None:
        return torch.zeros(site.num_users, config.embedding_dim)
    return torch.from_numpy(record["embedding"].numpy().copy())


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
