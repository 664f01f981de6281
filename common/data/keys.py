"""Per-user randomness keyed by ``(seed, user key)``: no user's draws depend on other users.

The privacy unit is one user with all their interactions at one site, and the
neighbouring relation adds or removes one user. Every random choice made for a
user (which of the user's interactions are held out, which site the user
belongs to, the user's ego-graph subsamples and ranking negatives in
:mod:`common.ego_graphs`) is drawn from a generator seeded by the run's seed, a
purpose tag and the user's key, and applied to the user's own interactions in
an order that does not depend on anyone else's rows. Removing a user therefore
changes no draw of any other user.

A user's key is a stable 63-bit integer derived from the user's original id
(SHA-256 of the id string), not the user's index: indices are assigned at load
time in id order and shift when a user is removed; original ids do not. The
same key names the user in a site's private state (private embeddings).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def stable_key(name: str) -> int:
    """A 63-bit integer that depends only on ``name`` (the first 8 bytes of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


def user_keys(user_ids: Sequence[str]) -> np.ndarray:
    """``[len(user_ids)]`` int64: the stable key of each original user id."""
    return np.fromiter(map(stable_key, user_ids), dtype=np.int64, count=len(user_ids))


# Purpose tags: separate streams for separate choices about the same user. They are
# 63-bit, so they never coincide with the epoch numbers of common.ego_graphs.
TEST_HOLDOUT = stable_key("fedgraphrec/split/test")
VAL_HOLDOUT = stable_key("fedgraphrec/split/val")
SITE = stable_key("fedgraphrec/partition/site")
GROUP_SHARES = stable_key("fedgraphrec/partition/group-shares")


def keyed_generator(seed: int, purpose: int, key: int) -> np.random.Generator:
    """The generator of one user's (or one group's) draws for ``purpose``."""
    return np.random.default_rng((seed, purpose, int(key)))


def keyed_uniforms(seed: int, purpose: int, keys: np.ndarray) -> np.ndarray:
    """One uniform draw in [0, 1) per key, each from that key's own generator."""
    return np.array([keyed_generator(seed, purpose, k).random() for k in keys.tolist()])
