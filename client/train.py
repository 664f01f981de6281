"""Local training at one site: Opacus DP-SGD over the site's users.

One sample is one user (``common.ego_graphs``). With ``dp = true`` the data
loader is Opacus's Poisson sampler with rate ``q = sample-rate`` and exactly
``1/q`` steps per local epoch; every included user's gradient is clipped to
``clip-norm`` and Gaussian noise with standard deviation
``noise-multiplier * clip-norm`` is added to the sum (Opacus ``DPOptimizer``,
``loss_reduction="sum"``: no division by a data-dependent batch size). The
site's accountant history is carried over from earlier rounds and returned,
so epsilon covers every step the site ever took.

Sampling and noise draw from generators seeded with fresh operating-system
entropy, never from the run's ``seed``: noise an observer could replay would
void the guarantee. (Opacus's ``secure_mode`` needs ``torchcsprng``, which has
no build for current PyTorch; see the README's limitations.)

With ``dp = false`` the same model and loss train on shuffled batches of the
same expected size, for comparison.
"""

from __future__ import annotations

import secrets
import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader

from common.config import RunConfig
from common.data.dataset import Catalogue
from common.data.site import SiteData
from common.ego_graphs import UserEgoGraphs
from common.model import EgoBatch, EgoGraphRecommender, build_model
from common.privacy import History, accountant_with_history
from common.text import item_text_vectors

PRIVATE_FIT_STEPS = 10
"""Adam steps of the private-embedding refit per round (public, the same for every user)."""
USERS_PER_CHUNK = 256
"""Users per forward pass when the refit accumulates the whole table's gradient."""


@dataclass(frozen=True)
class LocalTraining:
    """What one round of local training produced besides the updated model.

    Attributes:
        history: the site's accountant history including this round (DP only).
        mean_loss: mean per-user training loss of the round (non-DP only: with
            DP it is an un-noised statistic of private data and is not kept).
    """

    history: History
    mean_loss: float | None


def site_graphs(site: SiteData, config: RunConfig) -> UserEgoGraphs:
    """The ego graphs of the site's users, built from their training interactions."""
    features = site.user_features if config.user_features else site.user_features[:, :0]
    return UserEgoGraphs(
        site.train,
        site.user_keys,
        features,
        site.catalogue,
        config.degree_cap,
        config.edge_dropout,
        config.seed,
    )


def site_model(
    catalogue: Catalogue, config: RunConfig, device: torch.device | str = "cpu"
) -> EgoGraphRecommender:
    """The model as a site uses it: with the catalogue's text vectors when item text is on."""
    return build_model(catalogue, config, item_text_vectors(catalogue, config, device))


def entropy_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from the operating system's entropy."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def train_locally(
    model: EgoGraphRecommender,
    graphs: UserEgoGraphs,
    config: RunConfig,
    server_round: int,
    history: History,
    device: torch.device | str,
    private: torch.Tensor | None = None,
) -> LocalTraining:
    """Train ``model`` in place for ``config.local_epochs`` epochs of round ``server_round``.

    ``private`` is the site's ``[users, d]`` table of private user embeddings
    (``private-user-embedding = true``); it is an input to DP-SGD and is refit
    afterwards by :func:`fit_private_embeddings`.
    """
    model.to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameter_groups(config.weight_decay), lr=config.learning_rate
    )
    if config.dp:
        dp_model, optimizer, loader, criterion, engine = make_private(
            model, optimizer, graphs, config, config.steps_per_epoch, history, device
        )
    else:
        batch_size = max(1, round(len(graphs) / config.steps_per_epoch))
        loader = DataLoader(graphs, batch_size=batch_size, shuffle=True)
        dp_model, criterion = model, PerUserLoss()

    total_loss, total_users = 0.0, 0
    for epoch in range(config.local_epochs):
        graphs.set_epoch((server_round - 1) * config.local_epochs + epoch)
        for columns in loader:
            batch = EgoBatch(*columns).with_private(private).to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(dp_model(batch))
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) if not config.dp else 0.0
            total_users += len(batch.items)

    if config.dp:
        dp_model.remove_hooks()
    if private is not None:
        fit_private_embeddings(model, graphs, private, config, server_round, device)
    if not config.dp:
        return LocalTraining(history, total_loss / max(total_users, 1))
    return LocalTraining([tuple(step) for step in engine.accountant.history], None)


def fit_private_embeddings(
    model: EgoGraphRecommender,
    graphs: UserEgoGraphs,
    private: torch.Tensor,
    config: RunConfig,
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
    optimizer = torch.optim.Adam([table], lr=config.learning_rate)
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
    config: RunConfig,
    steps: int,
    history: History,
    device: torch.device | str,
) -> tuple:
    """Opacus's pieces for ``steps`` Poisson-sampled steps: ``(module, optimizer, loader,
    criterion, engine)``, the engine's accountant continuing from ``history``."""
    warnings.filterwarnings("ignore", message="Secure RNG turned off")  # see module docstring
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus hooks
    loader = DPDataLoader(
        graphs, sample_rate=config.sampling_probability, generator=entropy_generator()
    )
    # DPDataLoader takes int(1/q) steps, which is 92 for q = 1/93; pin it to `steps`
    # so the sampler and the accountant both see exactly `steps` steps at rate q.
    loader.batch_sampler.steps = steps
    engine = PrivacyEngine(accountant=config.accountant)
    engine.accountant = accountant_with_history(config.accountant, history)
    ghost = config.grad_sample_mode == "ghost"
    wrapped = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=config.noise_multiplier,
        max_grad_norm=config.clip_norm,
        poisson_sampling=False,
        loss_reduction="sum",
        grad_sample_mode=config.grad_sample_mode,
        noise_generator=entropy_generator(device),
        **({"criterion": PerUserLoss()} if ghost else {}),
    )
    criterion = wrapped[2] if ghost else PerUserLoss()
    return wrapped[0], wrapped[1], wrapped[-1], criterion, engine


def noisy_gradient_sum(
    model: EgoGraphRecommender,
    graphs: UserEgoGraphs,
    config: RunConfig,
    server_round: int,
    device: torch.device | str,
    private: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One DP-SGD step's noised sum, without applying it (secure aggregation).

    Poisson-samples the site's users at rate ``q``, clips each sampled user's
    gradient to ``clip-norm`` and adds Gaussian noise with standard deviation
    ``noise-multiplier * clip-norm`` (the caller passes the site's share of the
    noise), all by Opacus's ``DPOptimizer.pre_step``. Returns the result per
    parameter; the server sums these over sites and takes the optimizer step.
    """
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # never stepped
    dp_model, optimizer, loader, criterion, _ = make_private(
        model, optimizer, graphs, config, 1, [], device
    )
    graphs.set_epoch(server_round - 1)
    (columns,) = list(loader)
    batch = EgoBatch(*columns).with_private(private).to(device)
    optimizer.zero_grad(set_to_none=True)
    criterion(dp_model(batch)).backward()
    optimizer.pre_step()
    dp_model.remove_hooks()
    return {name: p.grad.detach().cpu().clone() for name, p in model.named_parameters()}


class PerUserLoss:
    """The criterion: sums the per-user losses the model returns.

    Opacus's ghost clipping sets ``reduction = "none"`` to get one loss per user.
    """

    reduction = "sum"

    def __call__(self, per_user_loss: torch.Tensor) -> torch.Tensor:
        return per_user_loss if self.reduction == "none" else per_user_loss.sum()
