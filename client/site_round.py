"""What a site does in a round, whichever Flower API delivered the instruction.

The Message API (``client.app``) and the legacy API that secure aggregation
needs (``client.secure_aggregation``) both open a :class:`SiteRound` from the
server's configuration and the node's ``node_config``; it loads the site's
data and state, plans the round's noise, decides whether the site must
decline (``max-epsilon``), records the round in the site's ledger and
evaluates the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.site_state import SiteState
from client.train import site_graphs, site_model
from common.config import RunConfig
from common.data import SiteData, load_site
from common.data.site_folder import load_site_folder
from common.ego_graphs import UserEgoGraphs
from common.errors import InputError
from common.evaluation import evaluate
from common.model import EgoGraphRecommender
from common.privacy import (
    CATALOGUE_FINGERPRINT,
    History,
    LedgerEntry,
    epsilon_spent,
    independent_epsilon,
    ledger_history,
    noise_multiplier_for,
    site_delta,
)

INSTRUCTION_KEYS = ("server-round", "run-name", CATALOGUE_FINGERPRINT)
"""What the server adds to the run configuration in every instruction."""


@dataclass
class SiteRound:
    """One round at one site (see the module docstring)."""

    config: RunConfig
    server_round: int
    run_name: str
    site: SiteData
    state: SiteState

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
        server_round, run_name, expected = (values.pop(k) for k in INSTRUCTION_KEYS)
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
        if site.catalogue.fingerprint() != str(expected):
            where = node_config.get("data-path", "the configured dataset")
            raise InputError(
                f"{where}: the site's item catalogue differs from the server's (fingerprint "
                f"{site.catalogue.fingerprint()[:12]} vs {str(expected)[:12]}); every site "
                "needs the catalogue the coordinator published"
            )
        return cls(config, int(server_round), str(run_name), site, state)

    @cached_property
    def device(self) -> torch.device:
        """``device = auto``: CUDA when available, else CPU."""
        name = self.config.device
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(name)

    def model(
        self, parameters: Mapping[str, torch.Tensor] | list[np.ndarray]
    ) -> EgoGraphRecommender:
        """The global item side, as a state dict or as arrays in state-dict order (legacy
        API), with the catalogue's text vectors."""
        model = site_model(self.site.catalogue, self.config, self.device)
        if not isinstance(parameters, Mapping):
            parameters = {
                key: torch.from_numpy(np.array(array))
                for key, array in zip(model.state_dict(), parameters, strict=True)
            }
        model.load_state_dict(parameters)
        return model.to(self.device)

    @cached_property
    def graphs(self) -> UserEgoGraphs:
        return site_graphs(self.site, self.config)

    @cached_property
    def delta(self) -> float:
        return site_delta(self.config, self.site.num_users)

    @cached_property
    def noise_multiplier(self) -> float:
        """Sigma of what the server sees: of each step, or of the secure sum."""
        return noise_multiplier_for(self.config, self.delta) if self.config.dp else 0.0

    @property
    def noise_share(self) -> float:
        """Sigma this site adds: its share under secure aggregation, else all of it."""
        if self.config.secure_aggregation:
            return self.noise_multiplier / math.sqrt(self.config.secagg_min_sites)
        return self.noise_multiplier

    @cached_property
    def ledger(self) -> list[LedgerEntry]:
        return self.state.ledger()

    @property
    def unbounded(self) -> bool:
        """No epsilon holds: this round or an earlier one trains without noise."""
        return not self.config.dp or any(e.without_noise for e in self.ledger)

    @property
    def training_config(self) -> RunConfig:
        """The configuration with the noise multiplier this site applies."""
        if not self.config.dp:
            return self.config
        return self.config.replace(noise_multiplier=self.noise_share)

    def declines(self) -> bool:
        """Whether this round would take the site past ``max-epsilon``."""
        if not self.config.dp or self.config.max_epsilon == 0:
            return False
        if self.unbounded:
            return True
        after = self.entry(trained=True)
        return after.epsilon > self.config.max_epsilon

    def entry(self, trained: bool) -> LedgerEntry:
        """The ledger entry of this round, trained or declined (not yet recorded)."""
        config = self.config
        round_entry = LedgerEntry(
            run=self.run_name,
            round=self.server_round,
            trained=trained,
            noise_multiplier=self.noise_multiplier,
            sample_rate=config.sampling_probability,
            steps=config.steps_per_round if trained else 0,
            clip_norm=config.clip_norm,
            delta=self.delta,
            accountant=config.accountant,
            epsilon=math.inf,
            independent_epsilon=math.inf,
            noise_share=self.noise_share,
            single_message_epsilon=math.inf,
        )
        if self.unbounded:
            return round_entry
        entries = [*self.ledger, round_entry]
        history: History = ledger_history(entries)
        return LedgerEntry(
            **{k: v for k, v in vars(round_entry).items() if not k.endswith("epsilon")},
            epsilon=epsilon_spent(config.accountant, history, self.delta),
            independent_epsilon=independent_epsilon(config.accountant, history, self.delta),
            single_message_epsilon=epsilon_spent(
                config.accountant, ledger_history(entries, single_message=True), self.delta
            )
            if config.secure_aggregation
            else epsilon_spent(config.accountant, history, self.delta),
        )

    def record(self, trained: bool) -> LedgerEntry:
        """Append this round to the site's ledger (before any reply leaves)."""
        entry = self.entry(trained)
        self.state.record(entry)
        return entry

    @property
    def history(self) -> History:
        """The accountant history of the site's earlier rounds, as its own noise shows it."""
        return ledger_history(self.ledger, single_message=True)

    def private_embeddings(self) -> torch.Tensor | None:
        if not self.config.private_user_embedding:
            return None
        return self.state.private_embeddings(self.site.user_keys, self.config.embedding_dim)

    def evaluate(self, model: EgoGraphRecommender) -> dict[str, float]:
        """Validation and test metrics, and the cold-start metrics with and without text."""
        site, config = self.site, self.config
        run = partial(
            evaluate,
            model,
            self.graphs,
            top_k=config.top_k,
            device=self.device,
            private=self.private_embeddings(),
        )
        metrics = {f"val-{k}": v for k, v in run(site.val).items()}
        metrics |= {f"test-{k}": v for k, v in run(site.test, exclude=site.val).items()}
        if len(site.cold_items):
            cold = partial(run, site.cold, candidates=site.cold_items)
            metrics |= {f"cold-{k}": v for k, v in cold().items()}
            if model.item_text_projection is not None:
                with model.text_disabled():
                    metrics |= {f"cold-{k}-without-text": v for k, v in cold().items()}
        return metrics


def item_counts(site: SiteData) -> np.ndarray:
    """Training interactions per catalogue item (sent only with ``dp = false``)."""
    return np.bincount(site.train.item, minlength=site.catalogue.num_items).astype(np.float32)
