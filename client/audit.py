r"""Empirical privacy audit of a site's DP-SGD in one training run.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run"
(NeurIPS 2023):

1. Add :math:`m` synthetic *canary users* to the site. Each has exactly one
   interaction, with its own canary item appended to the catalogue (no text),
   at the top of the rating scale. Each canary is included independently with
   probability 1/2.
2. Train the site exactly as a run would (same mechanism, noise multiplier,
   sampling rate, clip norm, steps, rounds).
3. Score every canary by how far its item's bias moved (up, the direction of
   its gradient). Guess "included" for the ``guesses`` highest scores and
   "excluded" for the ``guesses`` lowest; abstain on the rest.
4. Under :math:`(\varepsilon, \delta)`-DP, :math:`v` correct guesses out of
   :math:`r` are at most as likely as for :math:`\mathrm{Binomial}(r,
   e^\varepsilon / (1 + e^\varepsilon))`, up to a :math:`\delta` term (the
   paper's Theorem 3.3, implemented by :func:`p_value`). The empirical lower
   bound is the largest :math:`\varepsilon` that this rejects at the chosen
   p-value.

A sound mechanism never yields a lower bound above its accountant's epsilon
(except with the p-value's probability); without DP the canaries are exactly
separable and the bound is well above zero.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from scipy import stats

from client.train import site_graphs, site_model, train_locally
from common.config import RunConfig
from common.data import Interactions, SiteData, load_site
from common.privacy import epsilon_spent, noise_multiplier_for, site_delta


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


def with_canaries(site: SiteData, included: np.ndarray) -> tuple[SiteData, int]:
    """The site plus one canary user per included canary, each with its own new item.

    Returns the new site and the index of the first canary item (canary ``c``'s
    item is ``first + c``).
    """
    catalogue = site.catalogue
    first, m = catalogue.num_items, len(included)
    new_catalogue = dataclasses.replace(
        catalogue,
        item_ids=catalogue.item_ids + tuple(f"canary-{c}" for c in range(m)),
        item_text=None if catalogue.item_text is None else catalogue.item_text + ("",) * m,
    )
    canaries = np.flatnonzero(included)
    users = site.num_users + np.arange(len(canaries))
    canary_train = Interactions(
        user=users,
        item=first + canaries,
        rating=np.full(len(canaries), max(catalogue.rating_levels), np.float32),
        timestamp=None if site.train.timestamp is None else np.zeros(len(canaries), np.int64),
    )
    key_start = int(site.user_keys.max()) + 1 + 10**9  # never a real user's key
    return (
        dataclasses.replace(
            site,
            catalogue=new_catalogue,
            user_keys=np.concatenate([site.user_keys, key_start + canaries]),
            user_features=np.vstack(
                [site.user_features, np.zeros((len(canaries), site.user_features.shape[1]))]
            ).astype(np.float32),
            train=Interactions.concat([site.train, canary_train]),
        ),
        first,
    )


def audit_site(
    config: RunConfig,
    num_sites: int,
    site_id: int,
    canaries: int,
    guesses: int,
    seed: int,
    p: float = 0.05,
) -> dict[str, float | int | str]:
    """Run the one-run audit on site ``site_id`` of ``num_sites`` under ``config``."""
    if not 0 < 2 * guesses <= canaries:
        raise ValueError(f"guesses must be in 1..canaries/2, got {guesses} of {canaries}")
    rng = np.random.default_rng(seed)
    included = rng.random(canaries) < 0.5
    site, first = with_canaries(load_site(config, site_id, num_sites), included)
    delta = site_delta(config, site.num_users)
    sigma = noise_multiplier_for(config, delta) if config.dp else 0.0
    trained_config = config.replace(noise_multiplier=sigma) if config.dp else config

    torch.manual_seed(config.seed)
    model = site_model(site.catalogue, config)
    if model.item_text_projection is not None:  # canary items carry no text: only their id
        model.item_text[first:] = 0.0
    before = model.item_bias.weight.detach()[first:, 0].clone()
    graphs = site_graphs(site, config)
    history = []
    for server_round in range(1, config.num_server_rounds + 1):
        history = train_locally(model, graphs, trained_config, server_round, history, "cpu").history
    score = (model.item_bias.weight.detach()[first:, 0] - before).numpy()

    order = np.argsort(score, kind="stable")
    guessed_in, guessed_out = order[-guesses:], order[:guesses]
    correct = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
    return {
        "method": "one-run canary audit (Steinke, Nasr, Jagielski 2023)",
        "site": site_id,
        "canaries": canaries,
        "included": int(included.sum()),
        "guesses": 2 * guesses,
        "correct": correct,
        "p-value": p,
        "delta": delta,
        "epsilon-lower-bound": epsilon_lower_bound(canaries, 2 * guesses, correct, delta, p),
        "accountant-epsilon": epsilon_spent(config.accountant, history, delta)
        if config.dp
        else None,
        "score": "rise of the canary item's bias",
    }
