"""The built-in default data: a small synthetic catalogue shaped like a real one.

Deterministic by seed. Users belong to regions; a user's taste over eight genres
is the region's taste plus personal variation. Items have one to three genres,
a quality and a Zipf-like popularity. A user picks items with probability
proportional to ``popularity * exp(taste . genres)`` and rates them on a 1-5
scale from taste match, item quality, a personal bias and noise. Timestamps
follow each user's sessions. Every item has a short text (title, year, genres)
that reflects its genres, so text-aware models can use it. Users have an age
group and a region, like MovieLens users have demographics.
"""

from __future__ import annotations

import numpy as np

from common.data.dataset import Catalogue, Dataset, Interactions
from common.data.movielens import AGE_GROUPS

GENRES = (
    "Action", "Comedy", "Drama", "Documentary", "Romance", "Science Fiction", "Horror",
    "Animation",
)  # fmt: skip
REGIONS = ("north", "south", "east", "west", "centre")
_ADJECTIVES = (
    "Silent", "Golden", "Last", "Broken", "Hidden", "Midnight", "Electric", "Lost", "Wild",
    "Frozen", "Burning", "Secret", "Distant", "Crimson", "Little", "Final",
)  # fmt: skip
_NOUNS = (
    "River", "Empire", "Garden", "Signal", "Harbor", "Machine", "Summer", "Kingdom", "Road",
    "Witness", "Planet", "Orchestra", "Storm", "Letter", "Island", "Frontier",
)  # fmt: skip
_START_TIME = 1_577_836_800  # 2020-01-01T00:00:00Z


def generate_synthetic(num_users: int = 600, num_items: int = 400, seed: int = 0) -> Dataset:
    """Generate the default dataset (see the module docstring for the model).

    Every user has at least 10 interactions; degrees are log-normal, so a few
    users have many. Returns ratings 1-5 with timestamps, item text, and user
    features one-hot over age group and region.
    """
    rng = np.random.default_rng(seed)
    g = len(GENRES)

    region = rng.integers(0, len(REGIONS), size=num_users)
    region_taste = rng.normal(0.0, 1.0, size=(len(REGIONS), g))
    taste = region_taste[region] + rng.normal(0.0, 0.7, size=(num_users, g))
    age = rng.choice(len(AGE_GROUPS), size=num_users, p=[0.05, 0.2, 0.3, 0.2, 0.1, 0.1, 0.05])
    user_bias = rng.normal(0.0, 0.3, size=num_users)

    genre_count = rng.choice([1, 2, 3], size=num_items, p=[0.4, 0.4, 0.2])
    item_genres = np.zeros((num_items, g))
    for i in range(num_items):
        item_genres[i, rng.choice(g, size=genre_count[i], replace=False)] = 1.0
    item_factor = item_genres / np.sqrt(genre_count)[:, None]
    quality = rng.normal(0.0, 0.4, size=num_items)
    popularity = 1.0 / rng.permutation(np.arange(1, num_items + 1)) ** 0.9
    year = rng.integers(1960, 2020, size=num_items)

    degree = np.minimum(10 + rng.lognormal(3.0, 0.8, size=num_users).astype(int), num_items // 2)
    users, items, ratings, times = [], [], [], []
    for u in range(num_users):
        affinity = item_factor @ taste[u]
        weight = popularity * np.exp(affinity)
        chosen = rng.choice(num_items, size=degree[u], replace=False, p=weight / weight.sum())
        mean = 3.4 + 0.5 * affinity[chosen] + quality[chosen] + user_bias[u]
        stars = np.clip(np.rint(mean + rng.normal(0.0, 0.6, size=len(chosen))), 1, 5)
        first = _START_TIME + rng.integers(0, 365 * 86400)
        gaps = rng.exponential(3 * 86400, size=len(chosen)).astype(np.int64)
        users.append(np.full(len(chosen), u))
        items.append(chosen)
        ratings.append(stars)
        times.append(first + np.cumsum(gaps))

    text = tuple(
        f"The {_ADJECTIVES[rng.integers(len(_ADJECTIVES))]} {_NOUNS[rng.integers(len(_NOUNS))]}"
        f" ({year[i]}). Genres: {', '.join(GENRES[j] for j in np.flatnonzero(item_genres[i]))}."
        for i in range(num_items)
    )
    features = np.concatenate(
        [np.eye(len(AGE_GROUPS))[age], np.eye(len(REGIONS))[region]], axis=1
    ).astype(np.float32)
    catalogue = Catalogue(
        item_ids=tuple(str(i) for i in range(num_items)),
        item_text=text,
        rating_levels=(1.0, 2.0, 3.0, 4.0, 5.0),
        user_feature_names=tuple(f"age:{a}" for a in AGE_GROUPS)
        + tuple(f"region:{r}" for r in REGIONS),
    )
    return Dataset(
        name="synthetic",
        catalogue=catalogue,
        user_ids=tuple(str(u) for u in range(num_users)),
        interactions=Interactions(
            user=np.concatenate(users).astype(np.int64),
            item=np.concatenate(items).astype(np.int64),
            rating=np.concatenate(ratings).astype(np.float32),
            timestamp=np.concatenate(times).astype(np.int64),
        ),
        user_features=features,
        user_columns={
            "region": np.array(REGIONS)[region],
            "age-group": np.array(AGE_GROUPS)[age],
        },
    )
