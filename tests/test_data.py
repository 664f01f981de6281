"""Synthetic data, splits and site partitioning."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import default_config
from common.data import Interactions, load_dataset, load_site
from common.data.keys import TEST_HOLDOUT, user_keys
from common.data.partition import partition_users
from common.data.split import holdout, make_split
from common.data.synthetic import generate_synthetic
from common.errors import InputError


@pytest.fixture(scope="module")
def synthetic():
    return generate_synthetic(num_users=300, num_items=120, seed=3)


def test_synthetic_is_deterministic_and_shaped_like_a_catalogue(synthetic):
    again = generate_synthetic(num_users=300, num_items=120, seed=3)
    other = generate_synthetic(num_users=300, num_items=120, seed=4)
    inter = synthetic.interactions
    np.testing.assert_array_equal(inter.item, again.interactions.item)
    np.testing.assert_array_equal(inter.rating, again.interactions.rating)
    assert not np.array_equal(inter.item[:200], other.interactions.item[:200])
    assert set(np.unique(inter.rating)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert np.bincount(inter.user).min() >= 10
    popularity = np.sort(np.bincount(inter.item, minlength=120))[::-1]
    assert popularity[:12].sum() > 3 * popularity[-12:].sum()  # a popular head, a long tail
    assert (
        len(synthetic.catalogue.item_text) == 120 and "Genres:" in synthetic.catalogue.item_text[0]
    )
    assert synthetic.user_features.shape == (300, len(synthetic.catalogue.user_feature_names))
    assert len({(u, i) for u, i in zip(inter.user, inter.item, strict=True)}) == len(inter)


def test_random_split_is_per_user_and_keeps_a_training_interaction(synthetic):
    split = make_split(synthetic, "random", 0.1, 0.2, seed=0)
    total = len(split.train) + len(split.val) + len(split.test)
    assert total == len(synthetic.interactions)
    counts = np.bincount(synthetic.interactions.user)
    test_counts = np.bincount(split.test.user, minlength=len(counts))
    np.testing.assert_array_equal(test_counts, np.floor(counts * 0.2))
    assert np.all(np.bincount(split.train.user, minlength=len(counts)) >= 1)
    again = make_split(synthetic, "random", 0.1, 0.2, seed=0)
    np.testing.assert_array_equal(split.test.item, again.test.item)


def test_time_split_holds_out_each_users_latest_interactions(synthetic):
    split = make_split(synthetic, "time", 0.1, 0.1, seed=0)
    for user in range(20):
        train_times = split.train.timestamp[split.train.user == user]
        test_times = split.test.timestamp[split.test.user == user]
        val_times = split.val.timestamp[split.val.user == user]
        assert train_times.max() <= val_times.min() <= val_times.max() <= test_times.min()


def test_holdout_never_empties_a_user():
    single = Interactions(
        user=np.array([0, 1, 1]), item=np.array([0, 0, 1]), rating=np.ones(3, np.float32)
    )
    kept, held = holdout(single, user_keys(["a", "b"]), 0.9, 0, TEST_HOLDOUT)
    assert sorted(kept.user.tolist()) == [0, 1] and held.user.tolist() == [1]


def test_time_split_without_timestamps_is_a_clear_error():
    no_time = Interactions(np.array([0]), np.array([0]), np.ones(1, np.float32))
    with pytest.raises(InputError, match="split = 'time' needs timestamps"):
        holdout(no_time, user_keys(["a"]), 0.1, 0, TEST_HOLDOUT, by="time")


@pytest.mark.parametrize(
    ("scheme", "column"),
    [("iid", ""), ("dirichlet", ""), ("dirichlet", "region"), ("column", "region")],
)
def test_partition_is_deterministic_and_covers_every_user_once(synthetic, scheme, column):
    site = partition_users(synthetic, 4, scheme=scheme, seed=1, column=column, alpha=1.0)
    again = partition_users(synthetic, 4, scheme=scheme, seed=1, column=column, alpha=1.0)
    np.testing.assert_array_equal(site, again)
    assert site.shape == (synthetic.num_users,)
    assert set(site.tolist()) == {0, 1, 2, 3}


def test_column_partition_keeps_each_value_at_one_site(synthetic):
    site = partition_users(synthetic, 3, scheme="column", column="region")
    region = synthetic.user_columns["region"]
    for value in np.unique(region):
        assert len(np.unique(site[region == value])) == 1


def test_iid_partition_is_about_balanced(synthetic):
    # Each user's site is its own uniform draw: sizes are multinomial, not exactly equal.
    sizes = np.bincount(partition_users(synthetic, 7, seed=5), minlength=7)
    expected = synthetic.num_users / 7
    assert np.all(np.abs(sizes - expected) <= 4 * np.sqrt(expected))


def test_partition_errors_name_the_key(synthetic):
    with pytest.raises(InputError, match="partition-column"):
        partition_users(synthetic, 2, scheme="column", column="occupation")
    with pytest.raises(InputError, match="left site"):
        partition_users(synthetic, 6, scheme="column", column="region")
    with pytest.raises(InputError, match="partition: expected one of"):
        partition_users(synthetic, 2, scheme="random")


def test_sites_are_disjoint_and_share_the_catalogue():
    config = default_config(synthetic_users=200, synthetic_items=60)
    sites = [load_site(config, s, 3) for s in range(3)]
    keys = np.concatenate([s.user_keys for s in sites])
    assert len(keys) == len(set(keys.tolist())) == 200
    assert all(s.catalogue is sites[0].catalogue for s in sites)
    total = sum(len(s.train) + len(s.val) + len(s.test) for s in sites)
    assert total == len(load_dataset(config).interactions)
    for site in sites:
        assert site.train.user.max() < site.num_users
