"""The Flower ClientApp: one site.

Each handler opens the round at this site (``client.site_round``: its users
from ``node_config``, ``data-path`` in deployment or ``partition-id`` and
``num-partitions`` in simulation, its ledger and private state), runs the
round's sequence there and replies with what that sequence returns, already
checked against the release inventory.

With ``secure-aggregation = true`` the server drives training through Flower's
legacy API and SecAgg+ (``client.secure_aggregation``): those messages pass
through ``secaggplus_mod``; all others go straight to the handlers below.
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.secure_aggregation import handle_legacy, is_legacy, secure_aggregation_mod
from client.site_round import SiteReply, SiteRound
from common.protocol import ARRAYS, CONFIG, METRICS


def train(msg: Message, context: Context) -> Message:
    if is_legacy(msg):
        return handle_legacy(msg, context)
    site_round = SiteRound.open(context.node_config, msg.content[CONFIG])
    model = site_round.model(msg.content[ARRAYS].to_torch_state_dict())
    return reply(msg, site_round.train(model))


def evaluate(msg: Message, context: Context) -> Message:
    if is_legacy(msg):
        return handle_legacy(msg, context)
    site_round = SiteRound.open(context.node_config, msg.content[CONFIG])
    model = site_round.model(msg.content[ARRAYS].to_torch_state_dict())
    return reply(msg, site_round.evaluate(model))


def reply(msg: Message, site_reply: SiteReply) -> Message:
    content = RecordDict({METRICS: MetricRecord(site_reply.metrics)})
    if site_reply.arrays:
        content[ARRAYS] = ArrayRecord(site_reply.arrays)
    return Message(content=content, reply_to=msg)


def make_app(mods: Sequence[Mod] = (secure_aggregation_mod,)) -> ClientApp:
    """The site's ClientApp with ``mods`` (tests and benchmarks add their own around
    ``secure_aggregation_mod``)."""
    client_app = ClientApp(mods=list(mods))
    client_app.train()(train)
    client_app.evaluate()(evaluate)
    return client_app


app = make_app()
