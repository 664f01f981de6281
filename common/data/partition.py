"""Assigning users to sites: a user and all their interactions live at one site.

Schemes (all deterministic by seed):

- ``iid``: each user's site is uniform over the sites, drawn with the user's own
  keyed uniform (:mod:`common.data.keys`); sites hold about equal numbers of
  users, not exactly equal ones.
- ``dirichlet``: users are grouped (by a user column, or by behaviour clusters
  when no column is given); each group gets site proportions drawn from
  ``Dirichlet(alpha, ..., alpha)`` with the group's own generator (keyed by the
  group's value), and each user's keyed uniform picks the user's site from the
  proportions of the user's group. Small ``alpha`` makes sites very different;
  large ``alpha`` approaches ``iid``.
- ``column``: every value of a user column (e.g. occupation, zip region) goes
  whole to one site; values are dealt largest first to the site with the
  fewest users so far.

With ``iid`` and with ``dirichlet`` over a user column, a user's site depends
only on the seed, the user's key and the user's own attributes, so removing a
user moves no other user. Behaviour clusters (``dirichlet`` without a column)
are k-means over every user's items and so depend on all users: they are a
simulation device for non-IID sites, not part of the DP mechanism (the
partition happens before training and is not released; in deployment each
site owns its users and no partition is computed). Likewise ``column`` deals
whole values by their sizes.

A scheme that would leave a site without users raises :class:`InputError`.
"""

from __future__ import annotations

import numpy as np

from common.data.dataset import Dataset
from common.data.keys import (
    GROUP_SHARES,
    SITE,
    keyed_generator,
    keyed_uniforms,
    stable_key,
    user_keys,
)
from common.errors import InputError

SCHEMES = ("iid", "dirichlet", "column")


def partition_users(
    dataset: Dataset,
    num_sites: int,
    scheme: str = "iid",
    seed: int = 0,
    column: str = "",
    alpha: float = 0.5,
) -> np.ndarray:
    """Return ``site_of_user``: ``[num_users]`` site index of every user."""
    if num_sites < 1:
        raise InputError(f"number of sites: expected at least 1, got {num_sites}")
    if scheme not in SCHEMES:
        raise InputError(f"partition: expected one of {SCHEMES}, got {scheme!r}")
    if scheme == "iid":
        site = _sites_by_share(_site_uniforms(dataset, seed), np.full(num_sites, 1.0 / num_sites))
    elif scheme == "column":
        site = _deal_groups(_user_column(dataset, column, scheme), num_sites)
    else:
        if alpha <= 0:
            raise InputError(f"dirichlet-alpha: expected a positive number, got {alpha}")
        groups = (
            _user_column(dataset, column, scheme)
            if column
            else behaviour_clusters(dataset, num_clusters=10, seed=seed)
        )
        site = _dirichlet(groups, _site_uniforms(dataset, seed), num_sites, alpha, seed)
    empty = sorted(set(range(num_sites)) - set(np.unique(site).tolist()))
    if empty:
        raise InputError(
            f"partition = {scheme!r} left site(s) {empty} without users out of {num_sites}; "
            "use fewer sites, another seed, a larger dirichlet-alpha, or another partition-column"
        )
    return site


def _user_column(dataset: Dataset, column: str, scheme: str) -> np.ndarray:
    if column not in dataset.user_columns:
        raise InputError(
            f"partition-column: partition = {scheme!r} needs a user column of dataset "
            f"{dataset.name!r}; expected one of {sorted(dataset.user_columns)}, got {column!r}"
        )
    return dataset.user_columns[column]


def _deal_groups(groups: np.ndarray, num_sites: int) -> np.ndarray:
    values, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    load = np.zeros(num_sites, dtype=np.int64)
    site_of_value = np.empty(len(values), dtype=np.int64)
    for v in np.lexsort((values, -counts)):
        site_of_value[v] = int(np.argmin(load))
        load[site_of_value[v]] += counts[v]
    return site_of_value[inverse]


def _site_uniforms(dataset: Dataset, seed: int) -> np.ndarray:
    """Each user's keyed uniform in [0, 1) that picks the user's site."""
    return keyed_uniforms(seed, SITE, user_keys(dataset.user_ids))


def _sites_by_share(uniform: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """The site whose slice of [0, 1), in proportion to ``shares``, holds each uniform."""
    bounds = np.cumsum(shares)[:-1] / shares.sum()
    return np.searchsorted(bounds, uniform, side="right").astype(np.int64)


def _dirichlet(
    groups: np.ndarray, uniform: np.ndarray, num_sites: int, alpha: float, seed: int
) -> np.ndarray:
    site = np.empty(len(groups), dtype=np.int64)
    for value in np.unique(groups):
        members = groups == value
        rng = keyed_generator(seed, GROUP_SHARES, stable_key(str(value)))
        site[members] = _sites_by_share(uniform[members], rng.dirichlet(np.full(num_sites, alpha)))
    return site


def behaviour_clusters(dataset: Dataset, num_clusters: int, seed: int) -> np.ndarray:
    """Cluster users by what they interacted with (k-means on a random projection).

    Each user's item set is projected to 32 dimensions with a seeded Gaussian
    matrix and normalised; 25 Lloyd iterations from k-means++-style seeds.
    """
    rng = np.random.default_rng(seed)
    projection = rng.normal(size=(dataset.num_items, 32))
    inter = dataset.interactions
    x = np.zeros((dataset.num_users, 32))
    np.add.at(x, inter.user, projection[inter.item])
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
    k = min(num_clusters, dataset.num_users)
    centres = x[[rng.integers(dataset.num_users)]]
    while len(centres) < k:
        d2 = ((x[:, None, :] - centres[None]) ** 2).sum(-1).min(1)
        centres = np.vstack([centres, x[rng.choice(len(x), p=d2 / d2.sum())]])
    for _ in range(25):
        label = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.stack(
            [x[label == c].mean(0) if np.any(label == c) else centres[c] for c in range(k)]
        )
    return label
