"""A site under secure aggregation: Flower's legacy API and SecAgg+ around the site's share.

Flower 1.42 has SecAgg+ only on its legacy API. The server's
``SecAggPlusWorkflow`` drives every site through four stages (set up, share
keys, collect masked vectors, unmask), all as ``train`` messages with a
``secaggplus_configs`` record; :func:`secure_aggregation_mod` hands exactly
those to Flower's ``secaggplus_mod``, which runs the protocol and calls
:class:`SecureSiteClient` for the site's vector. The vector is the site's
integer share (``client.site_round.SiteRound.secure_share``), chosen so that
SecAgg+'s quantisation passes it unchanged; the server learns only the sum
over the surviving sites.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message
from flwr.client import NumPyClient
from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
)

from client.site_round import PUBLIC_WEIGHT, SecureSumSettings, SiteRound


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run Flower's ``secaggplus_mod`` on SecAgg+ protocol messages only."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is not None and Key.STAGE in configs:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_legacy(msg: Message) -> bool:
    """Whether ``msg`` is a legacy FitIns/EvaluateIns (the secure-aggregation path)."""
    records = msg.content.config_records
    return "fitins.config" in records or "evaluateins.config" in records


def handle_legacy(msg: Message, context: Context) -> Message:
    return handle_legacy_message_from_msgtype(
        lambda ctx: SecureSiteClient(ctx).to_client(), msg, context
    )


class SecureSiteClient(NumPyClient):
    """The site's side of a secure-aggregation round (see the module docstring)."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list, int, dict]:
        site_round = SiteRound.open(self.context.node_config, config)
        share, site_reply = site_round.secure_share(site_round.model(parameters), self.settings())
        return [share], PUBLIC_WEIGHT, site_reply.metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        site_round = SiteRound.open(self.context.node_config, config)
        return 0.0, PUBLIC_WEIGHT, site_round.evaluate(site_round.model(parameters)).metrics

    def settings(self) -> SecureSumSettings:
        """The sum's settings that SecAgg+'s setup stage left in this node's state."""
        state = self.context.state.config_records[RECORD_KEY_STATE]
        return SecureSumSettings(
            reconstruction_threshold=int(state["threshold"]),
            clipping_range=float(state["clipping_range"]),
            quantization_range=int(state["target_range"]),
        )
