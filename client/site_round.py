"""What a site does in a round, whichever Flower API delivered the instruction.

The Message API (``client.app``) and the legacy API that secure aggregation
needs (``client.secure_aggregation``) both open a :class:`SiteRound` from the
server's instruction and the node's ``node_config`` and call one of its three
round sequences:

- :meth:`SiteRound.train`: local DP-SGD, then the item side; or, in the item
  graph's statistics rounds, the site's statistics with its Gaussian noise
  (``common.graph.release``);
- :meth:`SiteRound.secure_share`: the same vector (one step's clipped gradient
  sum, or the statistics) as a share of the secure sum
  (``common.distributed_noise``);
- :meth:`SiteRound.evaluate`: validation, test and cold-start metrics, of the
  model or of the released item graph: exact, or under ``evaluation = "dp"`` as
  per-user sums with Gaussian noise (``common.metric_release``).

Every release follows one sequence: if it would take the site past
``max-epsilon`` the site declines (its reply says ``declined``, and under secure
aggregation its share is noise alone, so the sum keeps all its noise and the
site's users are not touched); otherwise it computes, then records the release
in its ledger *before* anything leaves (spent budget stays spent, whatever
happens next), then replies. Every reply is checked against the release
inventory (``common.privacy.released_quantities``) before it is returned.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from client.site_state import SiteState
from client.train import (
    clipped_gradient_sum,
    fit_private_embeddings,
    site_graphs,
    site_model,
    train_locally,
)
from common.config import RunConfig
from common.data import SiteData, load_site
from common.data.site_folder import load_site_folder
from common.distributed_noise import IntegerCode, encode, round_seed
from common.ego_graphs import UserEgoGraphs
from common.errors import InputError
from common.evaluation import RankingSums, RatingErrors, evaluate, evaluate_graph
from common.graph.filters import release_vector
from common.graph.release import ItemGraph, contribution, rating_settings
from common.graph.release import length as statistics_length
from common.graph.release import sensitivity as statistics_sensitivity
from common.metric_release import evaluation_parts, noisy_sums
from common.model import EgoGraphRecommender, build_model, item_side_size
from common.privacy import (
    LedgerEntry,
    Mechanism,
    RoundRelease,
    ledger_entry,
    site_mechanism,
    undeclared_releases,
)
from common.protocol import (
    CATALOGUE_FINGERPRINT,
    INSTRUCTION_KEYS,
    ITEM_COUNTS,
    ITEM_GRAPH,
    ITEM_GRAPH_FINGERPRINT,
    NUM_EXAMPLES,
    RUN_NAME,
    SERVER_ROUND,
    SITE_ID,
    STATISTICS,
    STATISTICS_COLUMNS,
    STATISTICS_ROWS,
    TRAIN_LOSS,
)
from common.text import item_text_vectors

PUBLIC_WEIGHT = 1
"""Every site's weight in the secure sum, and the example count it reports."""


@dataclass(frozen=True)
class SiteReply:
    """A reply's content, checked against the release inventory."""

    metrics: dict[str, float | int]
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class SecureSumSettings:
    """What SecAgg+ told this site about the sum of this round (its setup stage)."""

    reconstruction_threshold: int
    clipping_range: float
    quantization_range: int


@dataclass
class SiteRound:
    """One round at one site (see the module docstring)."""

    config: RunConfig
    server_round: int
    run_name: str
    site: SiteData
    state: SiteState
    graph: ItemGraph

    @classmethod
    def open(cls, node_config: Mapping[str, Any], values: Mapping[str, Any]) -> SiteRound:
        """Read the instruction ``values`` and load this node's site and its state.

        Deployment: ``node_config["data-path"]`` is the site's data folder
        (``common.data.site_folder``), state under ``<data-path>/state``.
        Simulation: site ``partition-id`` of ``num-partitions`` of the configured
        dataset, state under ``site-state-dir``. Either way the site's catalogue
        must be the one the server built the model for.
        """
        values = dict(values)
        instruction = {key: values.pop(key) for key in INSTRUCTION_KEYS}
        fingerprint, payload = (
            values.pop(ITEM_GRAPH_FINGERPRINT, None),
            values.pop(ITEM_GRAPH, None),
        )
        config = RunConfig.from_mapping(values)
        if "data-path" in node_config:
            folder = Path(str(node_config["data-path"])).expanduser()
            site, state = load_site_folder(folder), SiteState(folder / "state")
        elif "partition-id" in node_config and "num-partitions" in node_config:
            site = load_site(
                config, int(node_config["partition-id"]), int(node_config["num-partitions"])
            )
            state = SiteState.in_simulation(config.site_state_dir, site)
        else:
            raise InputError(
                "node_config: expected data-path (deployment: --node-config "
                "'data-path=\"/srv/site\"') or partition-id and num-partitions (simulation)"
            )
        expected = str(instruction[CATALOGUE_FINGERPRINT])
        if site.catalogue.fingerprint() != expected:
            where = node_config.get("data-path", "the configured dataset")
            raise InputError(
                f"{where}: the site's item catalogue differs from the server's (fingerprint "
                f"{site.catalogue.fingerprint()[:12]} vs {expected[:12]}); every site "
                "needs the catalogue the coordinator published"
            )
        graph = (
            ItemGraph()
            if fingerprint is None
            else released_graph(state.item_graph(str(fingerprint), payload))
        )
        server_round, run_name = int(instruction[SERVER_ROUND]), str(instruction[RUN_NAME])
        return cls(config, server_round, run_name, site, state, graph)

    @cached_property
    def device(self) -> torch.device:
        """``device = auto``: CUDA when available, else CPU."""
        name = self.config.device
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(name)

    @cached_property
    def mechanism(self) -> Mechanism:
        return site_mechanism(self.config, item_side_size(self.site.catalogue, self.config))

    @cached_property
    def item_side_keys(self) -> set[str]:
        return set(build_model(self.site.catalogue, self.config).state_dict())

    @cached_property
    def graphs(self) -> UserEgoGraphs:
        return site_graphs(self.site, self.config, self.graph)

    @cached_property
    def ledger(self) -> list[LedgerEntry]:
        return self.state.ledger()

    def model(
        self, parameters: Mapping[str, torch.Tensor] | list[np.ndarray]
    ) -> EgoGraphRecommender:
        """The global item side, as a state dict or as arrays in state-dict order (legacy
        API), with the catalogue's text vectors."""
        model = site_model(self.site.catalogue, self.config, self.device, self.graph)
        if not isinstance(parameters, Mapping):
            parameters = {
                key: torch.from_numpy(np.array(array))
                for key, array in zip(model.state_dict(), parameters, strict=True)
            }
        model.load_state_dict(parameters)
        return model.to(self.device)

    @property
    def training_release(self) -> RoundRelease:
        """What this round's training releases: the item graph's statistics, or DP-SGD."""
        if not self.config.is_statistics_round(self.server_round):
            return self.mechanism.training()
        catalogue, server_round = self.site.catalogue, self.server_round
        size = statistics_length(self.config, catalogue, server_round, self.graph)
        sensitivity = statistics_sensitivity(self.config, catalogue, server_round)
        return self.mechanism.statistics(server_round, size, sensitivity)

    @cached_property
    def statistics(self) -> np.ndarray | sp.csr_matrix:
        """The site's exact statistics of this round (``common.graph.release``)."""
        return contribution(self.config, self.site, self.server_round, self.graph)

    def train(self, model: EgoGraphRecommender) -> SiteReply:
        """Local training (Message API): the item side or the statistics, or a decline."""
        if self.declines(self.training_release):
            return self.checked("train", self.record(self.training_release, False).metrics())
        if self.config.is_statistics_round(self.server_round):
            return self.noisy_statistics()
        private = self.private_embeddings()
        result = train_locally(
            model,
            self.graphs,
            self.config,
            mechanism=self.mechanism,
            server_round=self.server_round,
            device=self.device,
            private=private,
        )
        entry = self.record(self.training_release, trained=True)
        if private is not None:
            self.state.save_private_embeddings(self.site.user_keys, private)
        arrays = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if self.config.dp:
            return self.checked("train", entry.metrics(), arrays)
        arrays[ITEM_COUNTS] = torch.as_tensor(item_counts(self.site))
        metrics = {NUM_EXAMPLES: self.site.num_users, TRAIN_LOSS: result.mean_loss}
        return self.checked("train", metrics, arrays)

    def noisy_statistics(self) -> SiteReply:
        """This round's statistics, with the site's Gaussian noise under DP."""
        total, release = self.statistics, self.training_release
        if release.noise_multiplier > 0:
            rng = np.random.default_rng(secrets.randbits(128))
            total = release_vector(total, release.sensitivity, release.noise_multiplier, rng)
        entry = self.record(release, trained=True)
        metrics = entry.metrics() if self.config.dp else {NUM_EXAMPLES: self.site.num_users}
        return self.checked("train", metrics, statistics_arrays(total))

    def secure_share(
        self, model: EgoGraphRecommender, settings: SecureSumSettings
    ) -> tuple[np.ndarray, SiteReply]:
        """This site's integer share of the round's secure sum, and its metrics.

        First checks that SecAgg+ reconstructs this round only from at least the
        ``secagg-min-sites`` sites that the noise share assumes, and passes the
        integers unchanged; nothing private has been computed at that point.
        """
        statistics_round = self.config.is_statistics_round(self.server_round)
        code = self.mechanism.code if not statistics_round else self.release_code()
        expected = (self.config.secagg_min_sites, code.modulus / 2, code.modulus)
        actual = (
            settings.reconstruction_threshold,
            settings.clipping_range,
            settings.quantization_range,
        )
        if actual[0] < expected[0] or actual[1:] != expected[1:]:
            raise InputError(
                f"secure aggregation: SecAgg+ reconstructs from {actual[0]} sites with range "
                f"{actual[1]} and {actual[2]} levels, but this site's noise share needs at "
                f"least secagg-min-sites = {expected[0]} sites, range {expected[1]} and "
                f"{expected[2]} levels; refusing to send"
            )
        release = self.training_release
        if self.declines(release):
            gradient = np.zeros(code.dimension)  # the share is noise alone
            entry = self.record(release, trained=False)
        elif statistics_round:
            gradient = self.statistics
            entry = self.record(release, trained=True)
        else:
            private = self.private_embeddings()
            if private is not None:  # fit to the released item side first, then use it
                fit_private_embeddings(
                    model,
                    self.graphs,
                    private,
                    learning_rate=self.config.learning_rate,
                    server_round=self.server_round,
                    device=self.device,
                )
                self.state.save_private_embeddings(self.site.user_keys, private)
            sums = clipped_gradient_sum(
                model,
                self.graphs,
                mechanism=self.mechanism,
                grad_sample_mode=self.config.grad_sample_mode,
                server_round=self.server_round,
                device=self.device,
                private=private,
            )
            gradient = torch.cat([sums[k].flatten() for k in model.state_dict()]).double().numpy()
            entry = self.record(release, trained=True)
        seed = round_seed(self.run_name, self.server_round)
        share = encode(gradient, code, seed, np.random.default_rng(secrets.randbits(128)))
        metrics = entry.metrics() | {NUM_EXAMPLES: PUBLIC_WEIGHT}
        return share.astype(np.float64), self.checked("train", metrics)

    def release_code(self) -> IntegerCode:
        """The integer code of this round's statistics in the secure sum."""
        catalogue, server_round = self.site.catalogue, self.server_round
        return self.mechanism.statistics_code(
            server_round,
            statistics_length(self.config, catalogue, server_round, self.graph),
            statistics_sensitivity(self.config, catalogue, server_round),
        )

    def evaluate(self, model: EgoGraphRecommender) -> SiteReply:
        """Validation and test metrics (after the item graph's round 1, of the baseline
        its release gives; of the item graph once it is complete with ``item-graph =
        "filter"``; else of the model), and the cold-start metrics with
        and without text: exact, or as noisy per-user sums (``evaluation = "dp"``)."""
        site, config = self.site, self.config
        if not config.releases_metrics_in(self.server_round):
            return self.checked("evaluate", {})  # the check-in: the site's id alone
        if config.evaluation == "dp":
            release = self.mechanism.evaluation()
            if self.declines(release):
                return self.checked("evaluate", self.record(release, False).metrics())
            results = self.heldout_results(model)
            rng = np.random.default_rng(secrets.randbits(128))
            sums = noisy_sums(config, results, release.noise_multiplier, rng)
            entry = self.record(release, trained=True)
            return self.checked("evaluate", entry.metrics() | sums)
        metrics: dict[str, float | int] = {
            f"{prefix}{name}{suffix}": value
            for (prefix, suffix), result in self.heldout_results(model).items()
            for name, value in result.metrics().items()
        }
        if not config.dp:
            metrics[NUM_EXAMPLES] = site.num_users
        elif config.secure_aggregation:
            metrics[NUM_EXAMPLES] = PUBLIC_WEIGHT
        return self.checked("evaluate", metrics)

    def heldout_results(
        self, model: EgoGraphRecommender
    ) -> dict[tuple[str, str], RatingErrors | RankingSums]:
        """What evaluation finds on each held-out part (``common.metric_release``'s
        parts): validation, test (validation items left out; with ``test-path`` also its
        warm rows), and the cold-start items ranked among themselves, with and without
        the model's text."""
        site, config = self.site, self.config
        baseline = config.is_statistics_round(self.server_round) and not self.graph.complete
        if (config.item_graph == "filter" and self.graph.complete) or baseline:
            settings = rating_settings(config)
            run = partial(
                evaluate_graph,
                self.graph,
                site,
                top_k=config.top_k,
                settings=settings,
                text=item_text_vectors(site.catalogue, config),
            )
        else:
            run = partial(
                evaluate,
                model,
                self.graphs,
                top_k=config.top_k,
                device=self.device,
                private=self.private_embeddings(),
            )
        results = {("val-", ""): run(site.val), ("test-", ""): run(site.test, exclude=site.val)}
        parts = evaluation_parts(config)
        if ("test-", "-warm") in parts:
            results[("test-", "-warm")] = run(site.warm_test, exclude=site.val)
        if ("cold-", "") in parts:
            cold = partial(run, site.cold, candidates=site.cold_items)
            results[("cold-", "")] = cold()
            if ("cold-", "-without-text") in parts:
                with model.text_disabled():
                    results[("cold-", "-without-text")] = cold()
        return results

    def declines(self, release: RoundRelease) -> bool:
        """Whether ``release`` would take the site past ``max-epsilon``."""
        if not self.config.dp or self.config.max_epsilon is None:
            return False
        return self.entry(release, trained=True).epsilon > self.config.max_epsilon

    def entry(self, release: RoundRelease, trained: bool) -> LedgerEntry:
        """The ledger entry of ``release`` in this round, made or declined (not yet
        recorded)."""
        return ledger_entry(
            self.mechanism, release, self.ledger, self.run_name, self.server_round, trained
        )

    def record(self, release: RoundRelease, trained: bool) -> LedgerEntry:
        """Append ``release`` to the site's ledger (before any reply leaves), composed
        with the ledger as it is when written (others may share it in simulation)."""
        return self.state.record(
            partial(
                ledger_entry,
                self.mechanism,
                release,
                run=self.run_name,
                server_round=self.server_round,
                trained=trained,
            )
        )

    def private_embeddings(self) -> torch.Tensor | None:
        if not self.config.private_user_embedding:
            return None
        return self.state.private_embeddings(self.site.user_keys, self.config.embedding_dim)

    def checked(
        self,
        message: str,
        metrics: dict[str, float | int],
        arrays: dict[str, torch.Tensor] | None = None,
    ) -> SiteReply:
        """The reply, with the site's id, after checking every key against the release
        inventory: a key the inventory does not list is never sent."""
        reply = SiteReply({SITE_ID: self.site.site_id} | metrics, arrays or {})
        undeclared = undeclared_releases(
            self.config, message, reply.arrays, reply.metrics, self.item_side_keys
        )
        if undeclared:
            raise RuntimeError(
                f"refusing to send values missing from the release inventory: {undeclared}"
            )
        return reply


@lru_cache(maxsize=1)
def released_graph(path: Path) -> ItemGraph:
    """The item graph a site keeps in ``path`` (named by the release's fingerprint,
    ``SiteState.item_graph``), parsed once per process: every instruction of a run names
    the same release once it is complete."""
    return ItemGraph.from_bytes(path.read_bytes())


def statistics_arrays(total: np.ndarray | sp.csr_matrix) -> dict[str, torch.Tensor]:
    """A round's statistics as the arrays of a reply: a vector, or a sparse Gram's parts."""
    if isinstance(total, np.ndarray):
        return {STATISTICS: torch.as_tensor(total)}
    coo = total.tocoo()
    values = coo.data.astype(np.float32)  # exact sums without DP; float32 halves the message
    parts = {STATISTICS_ROWS: coo.row, STATISTICS_COLUMNS: coo.col, STATISTICS: values}
    return {key: torch.as_tensor(value) for key, value in parts.items()}


def item_counts(site: SiteData) -> np.ndarray:
    """Training interactions per catalogue item (sent only with ``dp = false``)."""
    return np.bincount(site.train.item, minlength=site.catalogue.num_items).astype(np.float32)
