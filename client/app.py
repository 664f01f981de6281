"""The Flower ClientApp: one site.

It reads the run configuration from the server's message, loads the site's own
users (``node_config``: ``data-path`` in deployment, ``partition-id`` and
``num-partitions`` in simulation), trains or evaluates (``client.site_round``),
and replies with the item side only. Before a reply leaves, every key in it is
checked against the release inventory (``common.privacy.released_quantities``).

The site keeps its own privacy ledger and private user embeddings on its disk
(``client.site_state``). Before training it checks that the round would keep
it within ``max-epsilon``; if not, it declines and says so. After training it
records the round in the ledger, then replies.

With ``secure-aggregation = true`` the server drives the sites through
Flower's legacy API and SecAgg+ (``client.secure_aggregation``): those messages
pass through ``secaggplus_mod``; all others go straight to the handlers below.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secure_aggregation import handle_legacy, is_legacy, secure_aggregation_mod
from client.site_round import SiteRound, item_counts
from client.train import train_locally
from common.config import RunConfig
from common.model import EgoGraphRecommender
from common.privacy import ITEM_COUNTS, undeclared_releases

app = ClientApp(mods=[secure_aggregation_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    if is_legacy(msg):
        return handle_legacy(msg, context)
    site_round = SiteRound.open(context.node_config, msg.content["config"])
    config = site_round.config
    model = site_round.model(msg.content["arrays"].to_torch_state_dict())
    metrics: dict[str, float | int] = {"site-id": site_round.site.site_id}
    if site_round.declines():
        declined = site_round.record(trained=False)
        return reply(msg, config, "train", model, {}, metrics | declined.metrics())

    private = site_round.private_embeddings()
    result = train_locally(
        model,
        site_round.graphs,
        site_round.training_config,
        site_round.server_round,
        site_round.history,
        site_round.device,
        private,
    )
    entry = site_round.record(trained=True)  # before the reply leaves: spent budget stays spent
    if private is not None:
        site_round.state.save_private_embeddings(site_round.site.user_keys, private)

    arrays = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if config.dp:
        metrics |= entry.metrics()
    else:
        arrays[ITEM_COUNTS] = torch.as_tensor(item_counts(site_round.site))
        metrics |= {"num-examples": site_round.site.num_users, "train-loss": result.mean_loss}
    return reply(msg, config, "train", model, arrays, metrics)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    if is_legacy(msg):
        return handle_legacy(msg, context)
    site_round = SiteRound.open(context.node_config, msg.content["config"])
    model = site_round.model(msg.content["arrays"].to_torch_state_dict())
    metrics: dict[str, float | int] = {"site-id": site_round.site.site_id}
    metrics |= site_round.evaluate(model)
    if not site_round.config.dp:
        metrics["num-examples"] = site_round.site.num_users
    return reply(msg, site_round.config, "evaluate", model, {}, metrics)


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
