r"""Empirical privacy audit of a run's DP-SGD mechanism, in one training run.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run"
(NeurIPS 2023), with gradient canaries ("Dirac canaries", as in their
white-box experiments and in Andrew et al., ICLR 2024):

1. Take :math:`m` canaries, each included independently with probability 1/2.
   A canary is one more user of the site, Poisson-sampled by the same data
   loader as everyone else, whose per-sample gradient is a Dirac: the clip norm
   :math:`C` on one coordinate of its own (the bias of a canary item appended
   to the catalogue) and zero elsewhere. That is the gradient an adversary
   would choose to be found, so the audit measures the mechanism, not the model.
2. Run the run's mechanism (``common.privacy.site_mechanism``: sampling rate,
   clip norm, noise multiplier, steps over every round) with Opacus on
   synthetic users drawn uniformly over the public catalogue. No site's data
   is touched, so the audit spends no privacy budget.
3. Score every canary by the sum over all steps of the released noisy
   gradient at its coordinate: the accountant charges for releasing every
   step's noisy sum, so an auditor may look at each. Guess "included" for the
   ``guesses`` highest scores and "excluded" for the ``guesses`` lowest.
4. Under :math:`(\varepsilon, \delta)`-DP, :math:`v` correct guesses out of
   :math:`r` are at most as likely as for :math:`\mathrm{Binomial}(r,
   e^\varepsilon / (1 + e^\varepsilon))`, up to a :math:`\delta` term (the
   paper's Theorem 3.3, :func:`p_value`). The lower bound is the largest
   :math:`\varepsilon` this rejects at the chosen p-value.

The bound can never exceed the *ceiling* reached with every guess correct,
:func:`epsilon_lower_bound` at :math:`v = r`, which grows with the number of
guesses: the audit reports it, and says when it lies below the claimed epsilon
(the audit could then not refute the claim whatever happened). Under secure
aggregation the audit runs the sum's mechanism with continuous Gaussian noise
of the same :math:`\sigma`; the integer encoding is not re-run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace

import numpy as np
import torch
from scipy import stats

from client.train import make_private, site_graphs, site_model
from common.accounting import epsilon
from common.config import RunConfig
from common.data import Catalogue, Interactions, SiteData
from common.errors import InputError
from common.model import EgoBatch, item_side_size
from common.privacy import site_mechanism


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least ``v`` of ``r`` guesses correct] under (epsilon, delta)-DP, ``m`` canaries."""
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, below = 0.0, 0.0
    for i in range(1, v + 1):
        below += stats.binom.pmf(v - i, r, q)  # P[v - i <= Binomial(r, q) < v]
        alpha = max(alpha, below / i)
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, p: float = 0.05) -> float:
    """The largest epsilon whose p-value for ``v`` correct of ``r`` is below ``p``."""
    if p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < p:
        low, high = high, 2 * high
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(m, r, v, middle, delta) < p else (low, middle)
    return low


def synthetic_site(catalogue: Catalogue, users: int, degree: int, seed: int) -> SiteData:
    """``users`` public synthetic users, each with ``degree`` items drawn uniformly from
    the catalogue and ratings drawn uniformly from its scale (no one's data)."""
    rng = np.random.default_rng(seed)
    items = np.stack([rng.choice(catalogue.num_items, degree, replace=False) for _ in range(users)])
    levels = np.asarray(catalogue.rating_levels, np.float32)
    train = Interactions(
        user=np.repeat(np.arange(users), degree),
        item=items.ravel(),
        rating=rng.choice(levels, users * degree),
    )
    empty = Interactions.empty()
    return SiteData(
        site_id=0,
        catalogue=catalogue,
        user_keys=np.arange(users, dtype=np.int64),
        user_features=np.zeros((users, len(catalogue.user_feature_names)), np.float32),
        train=train,
        val=empty,
        test=empty,
        cold=empty,
        cold_items=np.zeros(0, np.int64),
    )


def with_canaries(site: SiteData, canaries: int) -> SiteData:
    """The site plus ``canaries`` users without interactions and as many new items: canary
    ``c`` is user ``site.num_users + c`` and owns the bias of item ``num_items + c``."""
    catalogue = site.catalogue
    extended = dataclasses.replace(
        catalogue,
        item_ids=catalogue.item_ids + tuple(f"canary-{c}" for c in range(canaries)),
        item_text=None if catalogue.item_text is None else catalogue.item_text + ("",) * canaries,
    )
    features = np.zeros((canaries, site.user_features.shape[1]), np.float32)
    return dataclasses.replace(
        site,
        catalogue=extended,
        user_keys=np.concatenate([site.user_keys, site.user_keys.max() + 1 + np.arange(canaries)]),
        user_features=np.vstack([site.user_features, features]),
    )


def audit_mechanism(
    config: RunConfig,
    catalogue: Catalogue,
    canaries: int,
    guesses: int,
    seed: int,
    users: int = 200,
    p: float = 0.05,
) -> dict[str, float | int | str | bool | None]:
    """Run the one-run audit of ``config``'s mechanism (see the module docstring)."""
    if not 0 < 2 * guesses <= canaries:
        raise InputError(
            f"--guesses: expected 1 to half of --canaries ({canaries}) guesses each way, "
            f"got {guesses}"
        )
    mechanism = site_mechanism(config, item_side_size(catalogue, config))
    if not mechanism.steps_planned:
        raise InputError(
            'audit: the run trained no DP-SGD steps (item-graph = "filter"); the audit '
            'measures DP-SGD, so audit a run with item-graph = "none" or "filter+gcn"'
        )
    rng = np.random.default_rng(seed)
    included = rng.random(canaries) < 0.5
    real = synthetic_site(catalogue, users, min(config.degree_cap, 10), seed)
    site = with_canaries(real, canaries)
    first_canary_item = catalogue.num_items

    torch.manual_seed(config.seed)
    # Without weight decay: it is post-processing of released parameters, which the
    # guarantee does not depend on, and would only blur the canaries' signal.
    audited = dataclasses.replace(
        config, grad_sample_mode="hooks", private_user_embedding=False, weight_decay=0.0
    )
    model = site_model(site.catalogue, audited)
    if model.item_text_projection is not None:  # canary items carry no text
        model.item_text[first_canary_item:] = 0.0
    graphs = site_graphs(site, audited)
    in_dataset = np.concatenate([np.ones(users, bool), included])
    loader_graphs = torch.utils.data.Subset(graphs, np.flatnonzero(in_dataset).tolist())

    optimizer = torch.optim.AdamW(
        model.parameter_groups(audited.weight_decay), lr=config.learning_rate
    )
    training = make_private(
        model,
        optimizer,
        loader_graphs,
        mechanism=mechanism,
        steps=mechanism.steps_planned,
        grad_sample_mode="hooks",
        device="cpu",
        noise_multiplier=mechanism.noise_multiplier,
    )
    score = np.zeros(canaries)
    for columns in training.loader:
        batch = EgoBatch(*columns)
        training.optimizer.zero_grad(set_to_none=True)
        training.backward(batch)
        bias = model.item_bias.weight
        for row, user in enumerate(batch.users.tolist()):
            if user >= users:  # canary user - users: a Dirac, C on its own coordinate
                bias.grad_sample[row, first_canary_item + user - users, 0] = mechanism.clip_norm
        if training.optimizer.pre_step():
            score += bias.grad[first_canary_item:, 0].detach().numpy()
            training.optimizer.original_optimizer.step()
    training.module.remove_hooks()

    order = np.argsort(score, kind="stable")
    guessed_in, guessed_out = order[-guesses:], order[:guesses]
    correct = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
    every_step = replace(mechanism.training().event, steps=mechanism.steps_planned)
    claimed = epsilon([every_step], config.delta, config.accountant) if mechanism.noisy else None
    ceiling = epsilon_lower_bound(canaries, 2 * guesses, 2 * guesses, config.delta, p)
    return {
        "method": "one-run audit with Dirac gradient canaries (Steinke, Nasr, Jagielski 2023)",
        "data": "synthetic users drawn uniformly over the public catalogue, plus the "
        "canaries: no site's data is touched, so the audit spends no privacy budget",
        "users": users,
        "canaries": canaries,
        "included": int(included.sum()),
        "steps": mechanism.steps_planned,
        "guesses": 2 * guesses,
        "correct": correct,
        "p-value": p,
        "delta": config.delta,
        "epsilon-lower-bound": epsilon_lower_bound(canaries, 2 * guesses, correct, config.delta, p),
        "epsilon-ceiling": ceiling,
        "accountant-epsilon": claimed,
        "ceiling-below-claim": claimed is not None and ceiling < claimed,
        "score": "sum over steps of the released noisy gradient at the canary's coordinate",
    }
