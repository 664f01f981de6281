"""One site's view of the data: its users, with local indices, and their splits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.data.dataset import Catalogue, Dataset, Interactions
from common.data.keys import user_keys
from common.data.split import Split


@dataclass(frozen=True)
class SiteData:
    """The private data of one site.

    Attributes:
        site_id: index of the site.
        catalogue: the public catalogue (identical at every site).
        user_keys: the stable key of each local user (local index = position),
            from the user's original id (:mod:`common.data.keys`): it seeds the
            user's randomness and names the user in the site's private state.
        user_features: ``[num_users, F]`` attributes of the local users.
        train, val, test: interactions with ``user`` = local index.
        cold: the site's interactions with held-out cold-start items.
        cold_items: the held-out items (public; empty without cold-start).
        test_warm: which test rows are warm, their user and item both in the
            training data (of every site: the loader's view); None: all of them.
    """

    site_id: int
    catalogue: Catalogue
    user_keys: np.ndarray
    user_features: np.ndarray
    train: Interactions
    val: Interactions
    test: Interactions
    cold: Interactions
    cold_items: np.ndarray
    test_warm: np.ndarray | None = None

    @property
    def num_users(self) -> int:
        return len(self.user_keys)

    @property
    def warm_test(self) -> Interactions:
        """The test rows whose user and item were both in the training data."""
        return self.test if self.test_warm is None else self.test.select(self.test_warm)


def site_view(dataset: Dataset, split: Split, site_of_user: np.ndarray, site_id: int) -> SiteData:
    """Restrict ``split`` to the users of ``site_id`` and re-index them locally (in id order)."""
    members = np.flatnonzero(site_of_user == site_id)
    local = np.full(dataset.num_users, -1, dtype=np.int64)
    local[members] = np.arange(len(members))

    def restrict(part: Interactions) -> Interactions:
        mine = part.select(local[part.user] >= 0)
        return Interactions(local[mine.user], mine.item, mine.rating, mine.timestamp)

    trained_users = np.bincount(split.train.user, minlength=dataset.num_users) > 0
    trained_items = np.bincount(split.train.item, minlength=dataset.num_items) > 0
    mine = local[split.test.user] >= 0
    warm = trained_users[split.test.user[mine]] & trained_items[split.test.item[mine]]
    return SiteData(
        site_id=site_id,
        catalogue=dataset.catalogue,
        user_keys=user_keys([dataset.user_ids[u] for u in members]),
        user_features=dataset.user_features[members],
        train=restrict(split.train),
        val=restrict(split.val),
        test=restrict(split.test),
        cold=restrict(split.cold),
        cold_items=split.cold_items,
        test_warm=warm,
    )
