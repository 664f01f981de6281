"""Local training at one site: Opacus DP-SGD over the site's users.

One sample is one user (``common.ego_graphs``). With ``dp = true`` the data
loader is Opacus's Poisson sampler with rate ``q = sample-rate`` and exactly
``1/q`` steps per local epoch; every included user's gradient is clipped to
``clip-norm`` and Gaussian noise with standard deviation
``noise-multiplier * clip-norm`` is added to the sum (Opacus ``DPOptimizer``,
``loss_reduction="sum"``: no division by a data-dependent batch size). The
noise multiplier, rate and clip norm come from the site's mechanism
(``common.privacy.site_mechanism``); the site's ledger accounts the steps.

Sampling and noise draw from generators seeded with fresh operating-system
entropy, never from the run's ``seed``: noise an observer could replay would
void the guarantee. (Opacus's ``secure_mode`` needs ``torchcsprng``, which has
no build for current PyTorch; see the README's limitations.)

With ``dp = false`` the same model and loss train on shuffled batches of the
same expected size, for comparison.
"""

from __future__ import annotations

import logging
import secrets
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.config import RunConfig
from common.data.dataset import Catalogue
from common.data.site import SiteData
from common.ego_graphs import UserEgoGraphs
from common.graph.features import GraphFeatures
from common.graph.propagation import propagation
from common.graph.release import ItemGraph, rating_settings
from common.model import EgoBatch, EgoGraphRecommender, build_model
from common.privacy import Mechanism
from common.text import item_text_vectors

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer

PRIVATE_FIT_STEPS = 10
"""Adam steps of the private-embedding refit per round (public, the same for every user)."""
GHOST_ABOVE_ITEMS = 5000
"""``grad-sample-mode = "auto"`` switches to ghost clipping above this many items."""
USERS_PER_CHUNK = 256
"""Users per forward pass when the refit accumulates the whole table's gradient."""

# An empty Poisson batch is part of the mechanism, not a fault: the step adds its noise
# to a zero gradient sum, as the accountant assumes. Opacus warns whenever a round's first
# batch is empty, about every other round at a site of 6 users and rate 0.1; at 1,000
# such sites the warnings filled the run's log.
logging.getLogger("opacus.data_loader").addFilter(
    lambda record: not record.getMessage().startswith("First batch is empty")
)


@dataclass(frozen=True)
class LocalTraining:
    """What one round of local training did besides updating the model.

    Attributes:
        steps: optimizer steps taken (with DP, exactly the mechanism's steps).
        mean_loss: mean per-user training loss of the round (non-DP only: with
            DP it is an un-noised statistic of private data and is not kept).
    """

    steps: int
    mean_loss: float | None


@dataclass(frozen=True)
class PrivateTraining:
    """Opacus's pieces for a run of Poisson-sampled DP-SGD steps (:func:`make_private`)."""

    module: torch.nn.Module
    optimizer: DPOptimizer
    loader: DataLoader
    criterion: PerUserLoss
    ghost: bool

    def backward(self, batch: EgoBatch) -> None:
        """Leave the sum of ``batch``'s clipped per-user gradients where the optimizer's
        step reads it (per-sample gradients with hooks, ``p.grad`` with ghost clipping).

        An empty Poisson batch is not run through the model. The sum over no users is
        zero, so each parameter gets what the backward pass would leave: no per-sample
        gradients with hooks, a zero gradient with ghost clipping; the step adds its
        noise to that as to any other sum. At a site of 6 users and rate 0.1 half the
        steps are empty, and Opacus 1.6's ghost clipping fails on one (its embedding
        norm sampler cannot reshape a batch of no users).
        """
        if len(batch.items) > 0:
            self.criterion(self.module(batch)).backward()
            return
        for parameter in self.optimizer.params:
            if self.ghost:
                parameter.grad = torch.zeros_like(parameter)
            else:
                parameter.grad_sample = parameter.new_zeros((0, *parameter.shape))


def site_graphs(site: SiteData, config: RunConfig, graph: ItemGraph | None = None) -> UserEgoGraphs:
    """The ego graphs of the site's users, built from their training interactions; with
    the learned model on the item graph, the released ``graph``'s features of each."""
    attributes = site.user_features if config.user_features else site.user_features[:, :0]
    features, negatives_from = None, None
    if learns_on(config, graph):
        text = item_text_vectors(site.catalogue, config)
        features = GraphFeatures(graph, site, rating_settings(config), text)
        negatives_from = np.flatnonzero(graph.touched)
    return UserEgoGraphs(
        site.train,
        site.user_keys,
        attributes,
        site.catalogue,
        config.degree_cap,
        config.edge_dropout,
        config.seed,
        features,
        negatives_from,
    )


def site_model(
    catalogue: Catalogue,
    config: RunConfig,
    device: torch.device | str = "cpu",
    graph: ItemGraph | None = None,
) -> EgoGraphRecommender:
    """The model as a site uses it: with the catalogue's text vectors when item text is on,
    and propagating over the released ``graph`` (``gcn-layers`` hops) when it learns on it."""
    text = item_text_vectors(catalogue, config, device)
    model = build_model(catalogue, config, text)
    if learns_on(config, graph):
        model.set_touched(graph.touched)
    if learns_on(config, graph) and config.gcn_layers:
        model.set_propagation(propagation(graph, catalogue.num_items, config.gcn_layers, text))
    return model


def learns_on(config: RunConfig, graph: ItemGraph | None) -> bool:
    """Whether the model learns on a released item graph (``item-graph = "filter+gcn"``,
    once the graph is complete)."""
    return config.item_graph == "filter+gcn" and graph is not None and graph.complete


def entropy_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from the operating system's entropy."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def train_locally(
    model: EgoGraphRecommender,
    graphs: UserEgoGraphs,
    config: RunConfig,
    *,
    mechanism: Mechanism,
    server_round: int,
    device: torch.device | str,
    private: torch.Tensor | None = None,
) -> LocalTraining:
    """Train ``model`` in place for ``config.local_epochs`` epochs of round ``server_round``.

    With a noisy ``mechanism`` every step is Opacus DP-SGD with its sampling rate,
    clip norm and the noise this site adds (``mechanism.noise_share``); without
    noise (``dp = false``) shuffled batches of the same expected size.
    ``private`` is the site's ``[users, d]`` table of private user embeddings
    (``private-user-embedding = true``); it is an input to DP-SGD and is refit
    afterwards by :func:`fit_private_embeddings`.
    """
    model.to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameter_groups(config.weight_decay), lr=config.learning_rate
    )
    if mechanism.noisy:
        private_training = make_private(
            model,
            optimizer,
            graphs,
            mechanism=mechanism,
            steps=config.steps_per_epoch,
            grad_sample_mode=config.grad_sample_mode,
            device=device,
        )
        module, optimizer = private_training.module, private_training.optimizer
        loader = private_training.loader
    else:
        batch_size = max(1, round(len(graphs) / config.steps_per_epoch))
        loader = DataLoader(graphs, batch_size=batch_size, shuffle=True)
        module, criterion = model, PerUserLoss()

    total_loss, total_users, steps = 0.0, 0, 0
    for epoch in range(config.local_epochs):
        graphs.set_epoch((server_round - 1) * config.local_epochs + epoch)
        for columns in loader:
            batch = EgoBatch(*columns).with_private(private).to(device)
            optimizer.zero_grad(set_to_none=True)
            if mechanism.noisy:
                private_training.backward(batch)
            else:
                loss = criterion(module(batch))
                loss.backward()
                total_loss += float(loss.detach())
                total_users += len(batch.items)
            optimizer.step()
            steps += 1

    if mechanism.noisy:
        module.remove_hooks()
    if private is not None:
        fit_private_embeddings(
            model,
            graphs,
            private,
            learning_rate=config.learning_rate,
            server_round=server_round,
            device=device,
        )
    mean_loss = None if mechanism.noisy else total_loss / max(total_users, 1)
    return LocalTraining(steps, mean_loss)


def fit_private_embeddings(
    model: EgoGraphRecommender,
    graphs: UserEgoGraphs,
    private: torch.Tensor,
    *,
    learning_rate: float,
    server_round: int,
    device: torch.device | str,
) -> None:
    """Fit every user's private embedding :math:`p_u` to that user's own loss, in place.

    The item side is frozen. Each of ``PRIVATE_FIT_STEPS`` steps is one Adam
    step on the whole table, with the gradient of every user's loss
    accumulated over all users (in chunks of ``USERS_PER_CHUNK`` to bound
    memory). Row :math:`u` of the gradient is the gradient of user :math:`u`'s
    own loss, and Adam's moments and bias correction are per element with a
    step count that is the same public constant for everyone, so
    :math:`p_u` is a function of user :math:`u`'s data and of the item side
    alone: no state is shared across users, whatever chunk a user falls in.

    This runs after DP-SGD and outside it: :math:`p_u` is never sent, and in
    the next round it is an input to ``u``'s own per-sample gradient only, so
    the user-level guarantee is unchanged.
    """
    table = private.detach().to(device, copy=True).requires_grad_()
    optimizer = torch.optim.Adam([table], lr=learning_rate)
    graphs.set_epoch(server_round - 1)
    chunks = [EgoBatch(*columns).to(device) for columns in DataLoader(graphs, USERS_PER_CHUNK)]
    model.requires_grad_(False)
    for _ in range(PRIVATE_FIT_STEPS):
        optimizer.zero_grad(set_to_none=True)
        for chunk in chunks:
            model(chunk.with_private(table)).sum().backward()
        optimizer.step()
    model.requires_grad_(True)
    private.copy_(table.detach().to(private.device))


def make_private(
    model: EgoGraphRecommender,
    optimizer: torch.optim.Optimizer,
    graphs: UserEgoGraphs,
    *,
    mechanism: Mechanism,
    steps: int,
    grad_sample_mode: str,
    device: torch.device | str,
    noise_multiplier: float | None = None,
) -> PrivateTraining:
    """Opacus's pieces for ``steps`` Poisson-sampled steps at the mechanism's rate and clip
    norm, adding noise ``noise_multiplier`` (default: the site's ``mechanism.noise_share``).

    ``grad_sample_mode = "auto"`` takes Opacus's ``hooks`` up to ``GHOST_ABOVE_ITEMS``
    catalogue items and ghost clipping beyond: hooks materialise a per-user gradient of
    the whole item embedding table (measured at 41k items: 58x the time of plain
    training and 3.4 GB, against 4x and 110 MB with ghost clipping; at 1.7k items hooks
    cost 2.5x against ghost's 3.6x). Opacus's own accountant is not used: the site's
    ledger accounts every release (``common.privacy.ledger_entry``).
    """
    # Imported here, not at the top: in deployment every message starts a fresh ClientApp
    # process, and Opacus's import (0.75 s) is only worth paying when a site trains.
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    if grad_sample_mode == "auto":
        large = model.item_embedding.num_embeddings > GHOST_ABOVE_ITEMS
        grad_sample_mode = "ghost" if large else "hooks"
    warnings.filterwarnings("ignore", message="Secure RNG turned off")  # see module docstring
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus hooks
    loader = DPDataLoader(graphs, sample_rate=mechanism.sample_rate, generator=entropy_generator())
    # DPDataLoader takes int(1/q) steps, which is 92 for q = 1/93; pin it to `steps`
    # so that the sampler takes exactly the steps the ledger accounts.
    loader.batch_sampler.steps = steps
    ghost = grad_sample_mode == "ghost"
    wrapped = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=mechanism.noise_share if noise_multiplier is None else noise_multiplier,
        max_grad_norm=mechanism.clip_norm,
        poisson_sampling=False,
        loss_reduction="sum",
        grad_sample_mode=grad_sample_mode,
        noise_generator=entropy_generator(device),
        **({"criterion": PerUserLoss()} if ghost else {}),
    )
    criterion = wrapped[2] if ghost else PerUserLoss()
    return PrivateTraining(wrapped[0], wrapped[1], wrapped[-1], criterion, ghost)


def clipped_gradient_sum(
    model: EgoGraphRecommender,
    graphs: UserEgoGraphs,
    *,
    mechanism: Mechanism,
    grad_sample_mode: str,
    server_round: int,
    device: torch.device | str,
    private: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One DP-SGD step's sum of clipped per-user gradients, without noise and unapplied.

    Poisson-samples the site's users at the mechanism's rate and clips each
    sampled user's gradient to its clip norm (Opacus's ``DPOptimizer.pre_step``
    with noise multiplier 0). The caller adds the noise: under secure
    aggregation, the site's integer share (``common.distributed_noise``).
    Returns the sum per parameter.
    """
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # never stepped
    private_training = make_private(
        model,
        optimizer,
        graphs,
        mechanism=mechanism,
        steps=1,
        grad_sample_mode=grad_sample_mode,
        device=device,
        noise_multiplier=0.0,
    )
    graphs.set_epoch(server_round - 1)
    (columns,) = list(private_training.loader)
    batch = EgoBatch(*columns).with_private(private).to(device)
    private_training.optimizer.zero_grad(set_to_none=True)
    private_training.backward(batch)
    private_training.optimizer.pre_step()
    private_training.module.remove_hooks()
    return {name: p.grad.detach().cpu().clone() for name, p in model.named_parameters()}


class PerUserLoss:
    """The criterion: sums the per-user losses the model returns.

    Opacus's ghost clipping sets ``reduction = "none"`` to get one loss per user.
    """

    reduction = "sum"

    def __call__(self, per_user_loss: torch.Tensor) -> torch.Tensor:
        return per_user_loss if self.reduction == "none" else per_user_loss.sum()
