r"""A site under secure aggregation: one noised DP-SGD step per round, summed by SecAgg+.

Flower 1.42 has SecAgg+ only on its legacy API. The server's
``SecAggPlusWorkflow`` drives every site through four stages (set up, share
keys, collect masked vectors, unmask), all as ``train`` messages with a
``secaggplus_configs`` record; :func:`secure_aggregation_mod` hands exactly
those to Flower's ``secaggplus_mod``, which runs the protocol and calls
:class:`SecureSiteClient` for the site's vector. The server learns only the
sum over the surviving sites.

Per round the site

1. computes one DP-SGD step's noised sum (``client.train.noisy_gradient_sum``):
   Poisson-sampled users, per-user clipping to :math:`C`, and its *share* of
   the noise, :math:`\mathcal N(0, \sigma^2 C^2 / T)` with :math:`T` =
   ``secagg-min-sites``. SecAgg+ reconstructs a sum only from at least
   :math:`T` sites (its reconstruction threshold), so the released sum always
   carries noise of at least :math:`\sigma C`;
2. checks that every coordinate lies within ``secagg-clipping-range``:
   SecAgg+ quantises values in that range to integers and would clip anything
   outside without a word, so a value outside fails the site's round with a
   message instead;
3. records the round in its ledger with both epsilons: against the server,
   which sees only the sum (:math:`\sigma`), and against a party that sees this
   site's message alone (:math:`\sigma / \sqrt T`);
4. sends the vector with the public weight 1 (no count in the clear).

The server adds the sites' sums and takes the optimizer step
(``server.secure_aggregation``), so model updates stay linear in the noised
gradients and the distributed noise adds up.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message
from flwr.client import NumPyClient
from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from client.site_round import SiteRound
from client.train import fit_private_embeddings, noisy_gradient_sum
from common.errors import InputError
from common.privacy import undeclared_releases

PUBLIC_WEIGHT = 1
"""Every site's weight in the secure sum, and the example count it reports."""


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
        model = site_round.model(parameters)
        if site_round.declines():
            site_round.record(trained=False)
            raise InputError(
                f"site {site_round.site.site_id} declines round {site_round.server_round}: it "
                f"would pass max-epsilon = {site_round.config.max_epsilon}"
            )
        private = site_round.private_embeddings()
        if private is not None:  # fit to the released item side first, then use it
            fit_private_embeddings(
                model,
                site_round.graphs,
                private,
                site_round.config,
                site_round.server_round,
                site_round.device,
            )
            site_round.state.save_private_embeddings(site_round.site.user_keys, private)
        gradients = noisy_gradient_sum(
            model,
            site_round.graphs,
            site_round.training_config,
            site_round.server_round,
            site_round.device,
            private,
        )
        bound = site_round.config.secagg_clipping_range
        largest = max(float(g.abs().max()) for g in gradients.values())
        if largest > bound:
            raise InputError(
                f"secagg-clipping-range: a coordinate of site {site_round.site.site_id}'s "
                f"noised gradient sum is {largest:.3g}, outside +-{bound}; SecAgg+ would clip "
                "it, so the site sends nothing this round (raise the range)"
            )
        entry = site_round.record(trained=True)  # before anything leaves the site
        metrics = {"site-id": site_round.site.site_id} | entry.metrics()
        self._check_releases(site_round, "train", metrics)
        return [gradients[k].numpy() for k in model.state_dict()], PUBLIC_WEIGHT, metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        site_round = SiteRound.open(self.context.node_config, config)
        metrics = {"site-id": site_round.site.site_id}
        metrics |= site_round.evaluate(site_round.model(parameters))
        self._check_releases(site_round, "evaluate", metrics)
        return 0.0, PUBLIC_WEIGHT, metrics

    @staticmethod
    def _check_releases(site_round: SiteRound, message: str, metrics: dict) -> None:
        undeclared = undeclared_releases(
            site_round.config, message, [], [*metrics, "num-examples"], ()
        )
        if undeclared:
            raise RuntimeError(
                f"refusing to send values missing from the release inventory: {undeclared}"
            )
