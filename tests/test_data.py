"""Synthetic data, splits and site partitioning."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import default_config
from common.data import Interactions, load_dataset, load_site, split_dataset
from common.data.dataset import Catalogue, Dataset
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


def sparse_dataset(num_users: int = 2000, seed: int = 0) -> Dataset:
    """Users with 2 to 9 interactions each, like a sparse real dataset."""
    rng = np.random.default_rng(seed)
    degree = rng.integers(2, 10, size=num_users)
    items = np.concatenate([rng.choice(50, size=d, replace=False) for d in degree])
    return Dataset(
        name="sparse",
        catalogue=Catalogue(tuple(map(str, range(50))), None, (1.0,)),
        user_ids=tuple(map(str, range(num_users))),
        interactions=Interactions(
            np.repeat(np.arange(num_users), degree), items, np.ones(len(items), np.float32)
        ),
        user_features=np.zeros((num_users, 0), np.float32),
    )


def test_a_per_dataset_fraction_holds_out_the_configured_share_of_sparse_data():
    sparse = sparse_dataset()
    total = len(sparse.interactions)
    per_user = make_split(sparse, "random", 0.1, 0.2, seed=0, per="user")
    # floor(n * 0.2) is 0 below 5 interactions and 1 up to 9: far below 20 % (and 10 %).
    assert len(per_user.test) / total < 0.13 and len(per_user.val) / total < 0.05
    per_dataset = make_split(sparse, "random", 0.1, 0.2, seed=0, per="dataset")
    assert abs(len(per_dataset.test) / total - 0.2) < 0.02
    assert abs(len(per_dataset.val) / total - 0.1) < 0.02
    users = sparse.num_users
    assert np.all(np.bincount(per_dataset.train.user, minlength=users) >= 1)
    assert len(per_dataset.train) + len(per_dataset.val) + len(per_dataset.test) == total


def test_split_fraction_per_is_checked():
    with pytest.raises(InputError, match="split-fraction-per: expected one of"):
        default_config(split_fraction_per="site")
    with pytest.raises(InputError, match=r"val-fraction \+ test-fraction: expected less than 1"):
        make_split(sparse_dataset(20), "random", 0.5, 0.5, seed=0)


@pytest.fixture
def own_split(tmp_path):
    """A training, a validation and a test file of one's own, and the catalogue file."""
    data = generate_synthetic(num_users=30, num_items=25, seed=1)
    (tmp_path / "items.csv").write_text("item\n" + "".join(f"{i}\n" for i in range(25)))
    inter = data.interactions
    part = np.arange(len(inter)) % 10
    parts = {"train": part >= 2, "val": part == 1, "test": part == 0}
    columns = (inter.user, inter.item, inter.rating, inter.timestamp)
    for name, rows in parts.items():
        lines = ["user,item,rating,timestamp"] + [
            f"{u},{i},{r:g},{t}" for u, i, r, t in zip(*(c[rows] for c in columns), strict=True)
        ]
        (tmp_path / f"{name}.csv").write_text("\n".join(lines) + "\n")
    return tmp_path, {name: int(rows.sum()) for name, rows in parts.items()}


def test_a_split_of_ones_own_is_used_as_given(own_split):
    folder, sizes = own_split
    config = default_config(
        dataset="csv",
        data_path=str(folder / "train.csv"),
        test_path=str(folder / "test.csv"),
        val_path=str(folder / "val.csv"),
        item_text_path=str(folder / "items.csv"),
        rating_scale="1..5",
        split="canonical",
    )
    split = split_dataset(load_dataset(config), config)
    assert (len(split.train), len(split.val), len(split.test)) == (
        sizes["train"],
        sizes["val"],
        sizes["test"],
    )
    # Without val-path, validation is carved from the training file.
    carved = split_dataset(load_dataset(config.replace(val_path="")), config)
    assert len(carved.test) == sizes["test"] and 0 < len(carved.val) < sizes["train"]


def test_a_split_of_ones_own_needs_the_canonical_split_and_the_csv_loader(own_split):
    folder, _ = own_split
    test_path = str(folder / "test.csv")
    with pytest.raises(InputError, match=r'test-path: .*needs split = "canonical"'):
        default_config(dataset="csv", data_path=str(folder / "train.csv"), test_path=test_path)
    with pytest.raises(InputError, match="val-path: needs test-path"):
        default_config(dataset="csv", val_path=test_path, split="canonical")
    config = default_config(
        dataset="lightgcn", data_path=str(folder), test_path=test_path, split="canonical"
    )
    with pytest.raises(InputError, match='test-path: only dataset = "csv"'):
        load_dataset(config)


def test_predicted_ratings_are_limited_to_the_public_scale_not_the_reference_one():
    catalogue = Catalogue(("a", "b"), None, tuple(float(level) for level in range(1, 11)))
    predicted = np.array([-3.0, 0.5, 7.25, 10.0, 12.0])
    np.testing.assert_array_equal(catalogue.limited(predicted), [1.0, 1.0, 7.25, 10.0, 10.0])
