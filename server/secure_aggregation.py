r"""The server under secure aggregation: SecAgg+ sums the sites' noised gradients.

Flower 1.42 offers SecAgg+ only on its legacy API, so this path runs
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` with the legacy
strategy below; the model, the site code and the run directory are the same as
on the Message API path.

Every round, every connected site (at least ``min-sites``) receives the
global item side and returns, through SecAgg+, one DP-SGD step's clipped
gradient sum as integers carrying its share of a distributed discrete Gaussian
(``client.site_round.SiteRound.secure_share``, ``common.distributed_noise``).
SecAgg+ uses the public weight 1 for every site, passes the integers through
its quantisation unchanged (range :math:`M/2`, :math:`M` levels) and
reconstructs only from at least :math:`T` = ``secagg-min-sites`` survivors
(its reconstruction threshold), so the server learns

.. math::
    G = \sum_{s \in S} \Big( \sum_{u \in B_s} \operatorname{clip}_C(g_u) \Big)
        + \text{noise of standard deviation at least } \sigma C,
    \qquad |S| \ge T,

and nothing about any single site's vector. The server decodes the sum
(:func:`common.distributed_noise.decode`) and takes an AdamW step with it
(same parameter groups as the sites use), so updates stay linear in the
noised gradients. If fewer than :math:`T` sites survive a round, SecAgg+
cannot unmask, nothing is released, the model stays, and the round is
recorded as discarded; so is a round whose sum wrapped around the modulus.
The threat model is in ``common.privacy.assumptions``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from logging import INFO, WARNING
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    log,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import FLOWER_LOGGER
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from common.config import RunConfig
from common.distributed_noise import IntegerCode, decode, round_seed
from common.errors import InputError
from common.graph.release import sensitivity
from common.model import EgoGraphRecommender
from common.privacy import Mechanism
from common.protocol import ITEM_GRAPH, RUN_NAME, SERVER_ROUND
from server.item_graph import GraphRelease, RejectedStatistics
from server.report_render import round_line
from server.round_book import NoSiteCompleted, RoundBook, RoundLog, last_line
from server.run_directory import RunDirectory
from server.strategy import sites_to_instruct

Ins = TypeVar("Ins", FitIns, EvaluateIns)


class SecureSumStrategy(FedAvg):
    """Legacy strategy: the server's optimizer step on the secure sum, logged in the book.

    Args:
        model: the global item side; updated in place.
        config: the run configuration.
        mechanism: the sites' mechanism (its integer codes decode the sums).
        instruction: the configuration every site receives (the run config plus the
            run's name and catalogue fingerprint); the round number and what has
            been released of the item graph are added.
        out: the run directory, rewritten after every round's evaluation.
        book: the run's round book.
        release: the item graph's release (its statistics rounds come first).
    """

    def __init__(
        self,
        model: EgoGraphRecommender,
        config: RunConfig,
        mechanism: Mechanism,
        instruction: dict,
        out: RunDirectory,
        book: RoundBook,
        release: GraphRelease,
    ) -> None:
        def with_round(server_round: int) -> dict:
            return instruction | {SERVER_ROUND: server_round}

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
        self.mechanism = mechanism
        self.release = release
        self.run_name = str(instruction[RUN_NAME])
        self.optimizer = torch.optim.AdamW(
            model.parameter_groups(config.weight_decay), lr=config.learning_rate
        )
        self.out = out
        self.book = book
        self.sampled: list[int] = []
        self.summed_rounds: set[int] = set()

    def wait_for_sites(self, server_round: int, client_manager: ClientManager) -> None:
        """As ``ItemSideFedAvg.wait_for_sites``, through the legacy client manager."""
        client_manager.wait_for(self.config.min_sites, timeout=int(self.config.site_timeout))
        nodes = {proxy.node_id for proxy in client_manager.all().values()}
        count = sites_to_instruct(
            server_round,
            nodes,
            self.config.min_sites,
            self.config.min_sites_to_continue,
            self.config.site_timeout,
            self.book,
        )
        self.min_fit_clients = self.min_evaluate_clients = self.min_available_clients = count

    def configure_fit(
        self, server_round: int, parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        if self.book.stopped_after is not None:
            return []
        self.wait_for_sites(server_round, client_manager)
        return self.with_graph(super().configure_fit(server_round, parameters, client_manager))

    def with_graph(
        self, instructions: list[tuple[ClientProxy, Ins]]
    ) -> list[tuple[ClientProxy, Ins]]:
        """Each instruction with what has been released of the item graph for its node
        (``GraphRelease.instruction``); the instructed nodes are ``sampled``. Those that
        carry the release's bytes share one configuration."""
        configs: dict[bool, dict] = {}
        with_graph = []
        for proxy, ins in instructions:
            graph = self.release.instruction(proxy.node_id)
            config = configs.setdefault(ITEM_GRAPH in graph, ins.config | graph)
            with_graph.append((proxy, replace(ins, config=config)))
        self.sampled = [proxy.node_id for proxy, _ in with_graph]
        return with_graph

    def replied(self, results: list[tuple[ClientProxy, Any]]) -> None:
        """Tell the release which instructed nodes answered (``GraphRelease.replied``)."""
        answered = {proxy.node_id for proxy, _ in results}
        for node_id in self.sampled:
            self.release.replied(node_id, node_id in answered)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list,
    ):
        """Step with the secure sum; every result carries the sum's mean over sites."""
        record = self.book.round(server_round)
        self.replied(results)
        declined = []
        for proxy, fit in results:
            self.book.identify(proxy.node_id, fit.metrics)
            declined.append(self.book.record_training(server_round, fit.metrics))
        self._record_dropouts(record, {proxy.node_id for proxy, _ in results}, failures)
        if not results or all(declined):
            self.book.stop_if_all_declined(server_round)
            return None, {}
        (mean,) = parameters_to_ndarrays(results[0][1].parameters)
        statistics_round = self.config.is_statistics_round(server_round)
        code = self.statistics_code(server_round) if statistics_round else self.mechanism.code
        try:
            total = decode(mean * len(results), code, round_seed(self.run_name, server_round))
        except OverflowError as overflow:
            log(WARNING, "Round %d discarded: %s", server_round, overflow)
            return None, {}
        self.summed_rounds.add(server_round)
        if statistics_round:
            try:
                self.release.check_secure_sum(server_round, total, len(results))
            except RejectedStatistics as rejection:
                log(WARNING, "Round %d discarded: %s", server_round, rejection)
                return None, {}
            self.release.add(server_round, total, len(results))
            return ndarrays_to_parameters(item_side_arrays(self.model)), {}
        gradient = total
        self.optimizer.zero_grad(set_to_none=True)
        offset = 0
        for parameter in self.model.parameters():
            size = parameter.numel()
            parameter.grad = torch.as_tensor(
                gradient[offset : offset + size].reshape(parameter.shape), dtype=parameter.dtype
            )
            offset += size
        self.optimizer.step()
        return ndarrays_to_parameters(item_side_arrays(self.model)), {}

    def statistics_code(self, server_round: int) -> IntegerCode:
        """The integer code of statistics round ``server_round``'s secure sum."""
        catalogue = self.release.catalogue
        return self.mechanism.statistics_code(
            server_round,
            self.release.expected_length(server_round),
            sensitivity(self.config, catalogue, server_round),
        )

    def _record_dropouts(self, record: RoundLog, survivors: set[int], failures: list) -> None:
        """Sites sampled but not in the sum (SecAgg+ does not say which failure was whose)."""
        reasons = sorted({last_line(str(f)) for f in failures if isinstance(f, BaseException)})
        for node_id in set(self.sampled) - survivors:
            record.failed[self.book.sender(node_id)] = "dropped out of the secure sum" + (
                f"; failures this round: {' | '.join(reasons)}" if reasons else ""
            )

    def evaluate(self, server_round: int, parameters):
        """Called after every round's fit: notes a round that released nothing, and
        rewrites the run directory; nothing once training has stopped."""
        if self.book.stopped_after is not None and server_round > self.book.stopped_after:
            return None
        self.book.finish(server_round)
        self.out.write_round(ArrayRecord(self.model.state_dict()), self.book)
        if server_round > 0 and server_round not in self.summed_rounds:
            self.book.round(server_round).discarded = True
            log(
                WARNING,
                "Round %d discarded: no usable secure sum (fewer than secagg-min-sites sites "
                "completed it, every site declined, or it wrapped around), so nothing was "
                "released and the model is unchanged",
                server_round,
            )
        if not self.config.evaluates_in(server_round):
            log(INFO, "%s", round_line(server_round, self.book.round(server_round)))
        return None

    def configure_evaluate(self, server_round: int, parameters, client_manager: ClientManager):
        if self.book.stopped_after is not None or not self.config.evaluates_in(server_round):
            return []
        self.wait_for_sites(server_round, client_manager)
        return self.with_graph(super().configure_evaluate(server_round, parameters, client_manager))

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list,
    ):
        self.replied(results)
        for proxy, res in results:
            self.book.identify(proxy.node_id, res.metrics)
        for failure in failures:
            node_id, reason = (
                (-1, str(failure))
                if isinstance(failure, BaseException)
                else (failure[0].node_id, failure[1].status.message)
            )
            self.book.record_failure(server_round, node_id, reason)
        self.book.check_completed(server_round, len(results))
        self.book.record_evaluation(
            server_round, [res.metrics for _, res in results], weighted=False
        )
        self.book.finish(server_round)
        self.out.write_round(ArrayRecord(self.model.state_dict()), self.book)
        log(INFO, "%s", round_line(server_round, self.book.round(server_round)))
        self.out.stop_if_no_gain(server_round, self.book)
        return None, {}  # the round book has them: Flower's history would repeat them


class WithoutCentralEvaluationLines(logging.Filter):
    """Drops the legacy workflow's lines about evaluating the initial parameters on the
    server: this strategy evaluates at the sites (round 0 is their check-in), so they
    would only say that nothing was evaluated there."""

    LINES = (
        "Starting evaluation of initial global parameters",
        "Evaluation returned no results (`None`)",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.LINES


def item_side_arrays(model: EgoGraphRecommender) -> list[np.ndarray]:
    """The item side as arrays in state-dict order (the legacy API's parameters)."""
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def check_sum_fits(sites: int, code: IntegerCode) -> None:
    """Fail fast when ``sites`` shares of ``2^bits`` levels each overflow SecAgg+'s 32 bits."""
    if sites * code.modulus >= 2**32:
        raise InputError(
            f"secagg-bits: {sites} sites with secagg-bits = {code.bits} overflow SecAgg+'s "
            f"32-bit sum; use secagg-bits <= {32 - sites.bit_length()}"
        )


def run_secure_aggregation(
    grid: Grid,
    context: Context,
    config: RunConfig,
    model: EgoGraphRecommender,
    mechanism: Mechanism,
    instruction: dict,
    out: RunDirectory,
    book: RoundBook,
    release: GraphRelease,
) -> None:
    """Run the rounds after round 0 (the item graph's, then DP-SGD's) by secure aggregation.

    SecAgg+ sees each site's integers in ``[-M/2, M/2)`` as values in its clipping
    range ``M/2`` with ``M`` quantisation levels, which it passes unchanged, and adds
    the sites' levels modulo 2^32; so at most ``2^(32 - secagg-bits) - 1`` sites fit.
    """
    code = mechanism.code
    check_sum_fits(len(grid.get_node_ids()), code)
    strategy = SecureSumStrategy(model, config, mechanism, instruction, out, book, release)
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=1.0,  # every sampled site holds a share of every other's key
            reconstruction_threshold=config.secagg_min_sites,
            max_weight=1.0,
            clipping_range=code.modulus / 2,
            quantization_range=code.modulus,
            timeout=config.round_timeout,
        )
    )
    legacy = LegacyContext(
        context, config=ServerConfig(num_rounds=config.total_rounds), strategy=strategy
    )
    quiet = WithoutCentralEvaluationLines()
    FLOWER_LOGGER.addFilter(quiet)
    try:
        workflow(grid, legacy)
    finally:
        FLOWER_LOGGER.removeFilter(quiet)
    out.write_round(ArrayRecord(model.state_dict()), book)
    if config.total_rounds and not strategy.summed_rounds and book.stopped_after is None:
        raise NoSiteCompleted(
            f"no secure sum completed in any of the {config.total_rounds} rounds "
            f"(fewer than secagg-min-sites = {config.secagg_min_sites} sites finished each)"
        )
