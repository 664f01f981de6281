"""Assigning users to sites: a user and all their interactions live at one site.

Schemes (all deterministic by seed):

- ``iid``: a random permutation of the users cut into equal parts.
- ``dirichlet``: users are grouped (by a user column, or by behaviour clusters
  when no column is given); each group's users are spread over the sites by
  proportions drawn from ``Dirichlet(alpha, ..., alpha)``. Small ``alpha``
  makes sites very different; large ``alpha`` approaches ``iid``.
- ``column``: every value of a user column (e.g. occupation, zip region) goes
  whole to one site; values are dealt largest first to the site with the
  fewest users so far.

A scheme that would leave a site without users raises :class:`InputError`.
"""

from __future__ import annotations

import numpy as np

from common.data.dataset import Dataset
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
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        site = np.empty(dataset.num_users, dtype=np.int64)
        site[rng.permutation(dataset.num_users)] = np.arange(dataset.num_users) % num_sites
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
        site = _dirichlet(groups, num_sites, alpha, rng)
    empty = sorted(set(range(num_sites)) - set(np.unique(site).tolist()))
    if empty:
        raise InputError(
            f"partition = {scheme!r} left site(s) {empty} without users out of {num_sites}; "
            "use fewer sites, a larger dirichlet-alpha, or another partition-column"
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


def _dirichlet(
    groups: np.ndarray, num_sites: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    site = np.empty(len(groups), dtype=np.int64)
    for value in np.unique(groups):
        members = rng.permutation(np.flatnonzero(groups == value))
        shares = rng.dirichlet(np.full(num_sites, alpha))
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for s, part in enumerate(np.split(members, cuts)):
            site[part] = s
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
