r"""The server under secure aggregation: SecAgg+ sums the sites' noised gradients.

Flower 1.42 offers SecAgg+ only on its legacy API, so this path runs
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` with the legacy
strategy below; the model, the site code and the run directory are the same as
on the Message API path.

Every round, every connected site (at least ``min-sites``) receives the
global item side and returns, through SecAgg+, one DP-SGD step's noised
gradient sum with its share of the noise (``client.secure_aggregation``).
SecAgg+ uses the public weight 1 for every site and reconstructs only from at
least :math:`T` = ``secagg-min-sites`` survivors (its reconstruction
threshold), so the server learns

.. math::
    G = \sum_{s \in S} \Big( \sum_{u \in B_s} \operatorname{clip}_C(g_u)
        + \mathcal N\big(0, \tfrac{\sigma^2 C^2}{T}\big) \Big),
    \qquad |S| \ge T,

whose noise has standard deviation at least :math:`\sigma C`, and nothing
about any single site's vector. The server takes an AdamW step with :math:`G`
(same parameter groups as the sites use), so updates stay linear in the
noised gradients. If fewer than :math:`T` sites survive a round, SecAgg+
cannot unmask, nothing is released, the model stays, and the round is
recorded as discarded.

Threat model: an honest-but-curious server that colludes with no site. If it
colluded with :math:`c < T` sites it would know their noise shares, and the
sum would still carry :math:`\sigma C \sqrt{(T - c)/T}`; the single-message
epsilon every site reports bounds the worst case (the server learns one
site's vector outright).
"""

from __future__ import annotations

import time
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import (
    EvaluateRes,
    FitIns,
    FitRes,
    log,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from common.config import RunConfig
from common.model import EgoGraphRecommender
from server.run_directory import RunDirectory
from server.strategy import RoundLog, last_line, mean_metrics


class SecureSumStrategy(FedAvg):
    """Legacy strategy: the server's optimizer step on the secure sum, and the round log.

    Args:
        model: the global item side; updated in place.
        config: the run configuration.
        instruction: the configuration every site receives (the run config plus the
            run's name and catalogue fingerprint); the round number is added.
        out: the run directory, rewritten after every round's evaluation.
        log: the round log so far (round 0's evaluation).
        site_of_node: which site each node said it was (round 0's evaluation).
    """

    def __init__(
        self,
        model: EgoGraphRecommender,
        config: RunConfig,
        instruction: dict,
        out: RunDirectory,
        log: dict[int, RoundLog],
        site_of_node: dict[int, int],
    ) -> None:
        def with_round(server_round: int) -> dict:
            return instruction | {"server-round": server_round}

        super().__init__(
            min_fit_clients=config.min_sites,
            min_evaluate_clients=config.min_sites,
            min_available_clients=config.min_sites,
            on_fit_config_fn=with_round,
            on_evaluate_config_fn=with_round,
            initial_parameters=ndarrays_to_parameters(item_side_arrays(model)),
        )
        self.model = model
        self.config = config
        self.optimizer = torch.optim.AdamW(
            model.parameter_groups(config.weight_decay), lr=config.learning_rate
        )
        self.out = out
        self.log = log
        self.stopped_after: int | None = None
        self.site_of_node = site_of_node
        self.sampled: list[int] = []
        self.summed_rounds: set[int] = set()

    def round_log(self, server_round: int) -> RoundLog:
        return self.log.setdefault(server_round, RoundLog())

    def configure_fit(
        self, server_round: int, parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self.sampled = [proxy.node_id for proxy, _ in instructions]
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list,
    ):
        """Step with the secure sum; the parameters of every result are the sum / |S|."""
        record = self.round_log(server_round)
        for proxy, fit in results:
            self.site_of_node[proxy.node_id] = int(fit.metrics["site-id"])
            record.train[int(fit.metrics["site-id"])] = dict(fit.metrics)
        self._record_dropouts(record, {proxy.node_id for proxy, _ in results}, failures)
        if not results:
            return None, {}
        self.summed_rounds.add(server_round)
        average = parameters_to_ndarrays(results[0][1].parameters)
        self.optimizer.zero_grad(set_to_none=True)
        for parameter, mean in zip(self.model.parameters(), average, strict=True):
            parameter.grad = torch.as_tensor(mean * len(results), dtype=parameter.dtype)
        self.optimizer.step()
        largest = max(float(fit.metrics["epsilon"]) for _, fit in results)
        log(INFO, "Round %d: stepped with the secure sum of %d sites", server_round, len(results))
        return ndarrays_to_parameters(item_side_arrays(self.model)), {"max-epsilon": largest}

    def _record_dropouts(self, record: RoundLog, survivors: set[int], failures: list) -> None:
        """Sites sampled but not in the sum (SecAgg+ does not say which failure was whose)."""
        reasons = sorted({last_line(str(f)) for f in failures if isinstance(f, BaseException)})
        for node_id in set(self.sampled) - survivors:
            site = self.site_of_node.get(node_id)
            sender = f"node {node_id}" if site is None else f"site {site}"
            record.failed[sender] = "dropped out of the secure sum" + (
                f"; failures this round: {' | '.join(reasons)}" if reasons else ""
            )

    def evaluate(self, server_round: int, parameters):
        """Called after every round's fit: notes a round that released nothing, and
        rewrites the run directory."""
        self.round_log(server_round).finished_at = time.time()
        self.out.write_round(ArrayRecord(self.model.state_dict()), self)
        if server_round > 0 and server_round not in self.summed_rounds:
            self.round_log(server_round).discarded = True
            log(
                WARNING,
                "Round %d discarded: fewer than secagg-min-sites sites completed the secure "
                "sum, so nothing was released and the model is unchanged",
                server_round,
            )
        return None

    def configure_evaluate(self, server_round: int, parameters, client_manager: ClientManager):
        if not self.config.evaluates_in(server_round):
            return []
        return super().configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list,
    ):
        record = self.round_log(server_round)
        for proxy, res in results:
            self.site_of_node[proxy.node_id] = int(res.metrics["site-id"])
            record.evaluate[int(res.metrics["site-id"])] = dict(res.metrics)
        if results:
            aggregated = mean_metrics(
                [MetricRecord(res.metrics) for _, res in results],
                weighted=False,
                skip=("site-id",),
            )
            record.aggregated = dict(aggregated)
        record.finished_at = time.time()
        self.out.write_round(ArrayRecord(self.model.state_dict()), self)
        return 0.0, record.aggregated


def item_side_arrays(model: EgoGraphRecommender) -> list[np.ndarray]:
    """The item side as arrays in state-dict order (the legacy API's parameters)."""
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def run_secure_aggregation(
    grid: Grid,
    context: Context,
    config: RunConfig,
    model: EgoGraphRecommender,
    instruction: dict,
    out: RunDirectory,
    log_so_far: dict[int, RoundLog],
    site_of_node: dict[int, int],
) -> SecureSumStrategy:
    """Run ``num-server-rounds`` rounds of secure aggregation; returns the strategy."""
    strategy = SecureSumStrategy(model, config, instruction, out, log_so_far, site_of_node)
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=1.0,  # every sampled site holds a share of every other's key
            reconstruction_threshold=config.secagg_min_sites,
            max_weight=1.0,
            clipping_range=config.secagg_clipping_range,
            quantization_range=config.secagg_quantization_range,
            timeout=config.round_timeout,
        )
    )
    legacy = LegacyContext(
        context, config=ServerConfig(num_rounds=config.num_server_rounds), strategy=strategy
    )
    workflow(grid, legacy)
    out.write_round(ArrayRecord(model.state_dict()), strategy)
    return strategy
