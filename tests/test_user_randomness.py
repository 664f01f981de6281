"""Per-user randomness: removing one user's raw data changes nothing for any other user.

The privacy unit is one user with all their interactions; every random choice
made for a user (held-out interactions, site, ego-graph subsamples and
negatives) must depend only on the seed and the user's own id and data. Each
test loads a dataset from files twice, with and without one user's lines, and
compares every other user's train/val/test interactions, site and ego-graph
samples. MovieLens-100K is read from ``../shared/datasets/ml-100k`` (skipped when
absent); the synthetic data is written to a CSV file and read by the ``csv``
loader.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from common.config import default_config
from common.data import load_dataset, partition_sites, split_dataset
from common.data.dataset import Interactions
from common.data.site import site_view
from common.data.synthetic import generate_synthetic
from common.ego_graphs import EVALUATION_EPOCH, UserEgoGraphs

ML_100K = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "ml-100k"
SITES = 4


def movielens_without(user_id: str, folder: Path) -> Path:
    """A copy of MovieLens-100K's files in ``folder`` without the user's lines."""
    folder.mkdir()
    for name in ("u.item", "u.genre", "u.occupation"):
        (folder / name).symlink_to((ML_100K / name).resolve())
    for name, separator in (
        ("u.user", b"|"),
        ("u.data", b"\t"),
        ("u1.base", b"\t"),
        ("u1.test", b"\t"),
    ):
        lines = (ML_100K / name).read_bytes().splitlines(keepends=True)
        kept = [line for line in lines if line.split(separator)[0] != user_id.encode()]
        assert len(kept) < len(lines), f"user {user_id} has no line in {name}"
        (folder / name).write_bytes(b"".join(kept))
    return folder


def synthetic_csv(path: Path, without: str | None = None) -> Path:
    """The synthetic data as a CSV file (user,item,rating,timestamp), optionally without a user."""
    data = generate_synthetic(num_users=240, num_items=90, seed=2)
    inter = data.interactions
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user", "item", "rating", "timestamp"])
        for u, i, r, t in zip(inter.user, inter.item, inter.rating, inter.timestamp, strict=True):
            if data.user_ids[u] != without:
                writer.writerow([f"user-{data.user_ids[u]}", i, int(r), t])
    return path


def rows_by_user(part: Interactions, item_ids: tuple[str, ...]) -> dict[int, list[tuple]]:
    """Each local user's interactions as sorted (item id, rating, timestamp) tuples."""
    rows: dict[int, list[tuple]] = {}
    for k in range(len(part)):
        time = None if part.timestamp is None else int(part.timestamp[k])
        entry = (item_ids[part.item[k]], float(part.rating[k]), time)
        rows.setdefault(int(part.user[k]), []).append(entry)
    return {u: sorted(r) for u, r in rows.items()}


def per_user(overrides: dict) -> dict[str, dict]:
    """Everything drawn for each user, keyed by original user id."""
    config = default_config(**overrides)
    dataset = load_dataset(config)
    split = split_dataset(dataset, config)
    site_of_user = partition_sites(dataset, config, SITES)
    view: dict[str, dict] = {}
    for site_id in range(SITES):
        site = site_view(dataset, split, site_of_user, site_id)
        graphs = UserEgoGraphs(
            site.train,
            site.user_keys,
            site.user_features,
            site.catalogue,
            degree_cap=8,
            edge_dropout=0.25,
            seed=config.seed,
        )
        members = np.flatnonzero(site_of_user == site_id)
        parts = {
            name: rows_by_user(getattr(site, name), site.catalogue.item_ids)
            for name in ("train", "val", "test")
        }
        for local, user in enumerate(members):
            samples = [
                tuple(t.numpy().tobytes() for t in graphs.samples([local], epoch)[0][:-1])
                for epoch in (0, 1, EVALUATION_EPOCH)
            ]
            view[dataset.user_ids[user]] = {
                "site": site_id,
                **{name: rows.get(local, []) for name, rows in parts.items()},
                "samples": samples,
            }
    return view


def assert_unchanged_for_others(full: dict[str, dict], without: dict[str, dict], removed: str):
    assert set(full) - set(without) == {removed}
    changed = {
        user: [what for what in full[user] if full[user][what] != without[user][what]]
        for user in without
    }
    changed = {user: what for user, what in changed.items() if what}
    assert not changed, f"{len(changed)} of {len(without)} other users changed, e.g. " + str(
        dict(list(changed.items())[:3])
    )
    assert any(full[removed][part] for part in ("train", "val", "test"))


ML_CASES = [
    {"split": "random", "partition": "iid"},
    {"split": "time", "partition": "dirichlet", "partition_column": "occupation"},
    {"split": "u1", "partition": "iid"},
    {"split": "random", "split_fraction_per": "dataset", "partition": "dirichlet",
     "partition_column": "gender"},
]  # fmt: skip


@pytest.mark.skipif(not ML_100K.is_dir(), reason=f"MovieLens-100K not found at {ML_100K}")
@pytest.mark.parametrize("case", ML_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_removing_a_movielens_user_changes_no_other_users_data(tmp_path_factory, case):
    folder = tmp_path_factory.getbasetemp() / "ml-100k-without-7"
    if not folder.exists():
        movielens_without("7", folder)
    common = {"dataset": "ml-100k", **case}
    full = per_user({**common, "data_path": str(ML_100K)})
    without = per_user({**common, "data_path": str(folder)})
    assert_unchanged_for_others(full, without, "7")


@pytest.mark.parametrize("split", ["random", "time"])
@pytest.mark.parametrize("per", ["user", "dataset"])
def test_removing_a_synthetic_user_changes_no_other_users_data(tmp_path, split, per):
    items = tmp_path / "items.csv"
    items.write_text("item\n" + "".join(f"{i}\n" for i in range(90)))
    common = {
        "dataset": "csv",
        "split": split,
        "split_fraction_per": per,
        "item_text_path": str(items),  # the public catalogue and scale
        "rating_scale": "1..5",
    }
    full = per_user({**common, "data_path": str(synthetic_csv(tmp_path / "all.csv"))})
    smaller = synthetic_csv(tmp_path / "without.csv", without="3")
    without = per_user({**common, "data_path": str(smaller)})
    assert_unchanged_for_others(full, without, "user-3")
