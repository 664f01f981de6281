"""The Flower ClientApp: one site.

Each handler opens the round at this site (``client.site_round``: its users
from ``node_config``, ``data-path`` in deployment or ``partition-id`` and
``num-partitions`` in simulation, its ledger and private state), runs the
round's sequence there and replies with what that sequence returns, already
checked against the release inventory.

With ``secure-aggregation = true`` the server drives training through Flower's
legacy API and SecAgg+ (``client.secure_aggregation``): those messages pass
through ``secaggplus_mod``; all others go straight to the handlers below.

Whatever fails at a site fails with a message that starts with the site's id
(``name_failures``, the outermost mod), so the server names the site, not its
Flower node id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.secure_aggregation import handle_legacy, is_legacy, secure_aggregation_mod
from client.site_round import SiteReply, SiteRound
from common.data.site_folder import site_folder_id
from common.protocol import ARRAYS, CONFIG, METRICS


class SiteFailed(RuntimeError):
    """A site's failure, its message ``site <id>: <the error's last line>``."""


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


def name_failures(msg: Message, context: Context, call_next) -> Message:
    """Mod: re-raise any error of the site as :class:`SiteFailed`, naming the site."""
    try:
        return call_next(msg, context)
    except Exception as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else type(error).__name__
        raise SiteFailed(f"{site_name(context.node_config)}: {reason}") from error


def site_name(node_config: Mapping[str, Any]) -> str:
    """``site <id>``: simulation's ``partition-id``, or the site folder's manifest; else
    the site folder's path."""
    if "partition-id" in node_config:
        return f"site {int(node_config['partition-id'])}"
    folder = str(node_config.get("data-path", "?"))
    site_id = site_folder_id(folder)
    return f"site at {folder}" if site_id is None else f"site {site_id}"


def make_app(mods: Sequence[Mod] = (secure_aggregation_mod,)) -> ClientApp:
    """The site's ClientApp with ``mods`` (tests and benchmarks add their own around
    ``secure_aggregation_mod``), inside :func:`name_failures`."""
    client_app = ClientApp(mods=[name_failures, *mods])
    client_app.train()(train)
    client_app.evaluate()(evaluate)
    return client_app


app = make_app()
