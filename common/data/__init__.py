"""Data: loaders (one module per format), splits, partitioning into sites.

:func:`load_dataset` picks the loader named by the ``dataset`` key;
:func:`load_site` gives one site its users in simulation, where every site
derives the same split and partition from the shared configuration and seed.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path

import numpy as np

from common.config import RunConfig
from common.data.dataset import Catalogue, Dataset, Interactions
from common.data.download import ensure_raw_files
from common.data.interactions_file import load_interactions_file
from common.data.lightgcn import load_lightgcn
from common.data.movielens import ML_100K_SPLITS, load_movielens_100k, load_movielens_dat
from common.data.partition import partition_users
from common.data.site import SiteData, site_view
from common.data.split import Split, make_split
from common.data.synthetic import generate_synthetic
from common.errors import InputError

__all__ = [
    "Catalogue",
    "Dataset",
    "Interactions",
    "SiteData",
    "Split",
    "load_dataset",
    "load_site",
]

DATASETS = ("synthetic", "ml-100k", "movielens-dat", "lightgcn", "csv")


def load_dataset(config: RunConfig) -> Dataset:
    """The dataset named by ``config.dataset``, read from ``config.data_path``; with
    ``implicit = true`` every interaction becomes plain implicit feedback."""
    dataset = _load(
        config.dataset,
        config.data_path,
        config.test_path,
        config.val_path,
        config.item_text_path,
        config.download,
        config.on_duplicate,
        config.split,
        config.synthetic_users,
        config.synthetic_items,
        config.seed,
    )
    return as_implicit(dataset) if config.implicit else dataset


def as_implicit(dataset: Dataset) -> Dataset:
    """Every interaction as implicit feedback: rating 1.0, one rating level."""

    def drop_ratings(part: Interactions | None) -> Interactions | None:
        if part is None:
            return None
        return Interactions(part.user, part.item, np.ones(len(part), np.float32), part.timestamp)

    return dataclasses.replace(
        dataset,
        catalogue=dataclasses.replace(dataset.catalogue, rating_levels=(1.0,)),
        interactions=drop_ratings(dataset.interactions),
        canonical_split=None
        if dataset.canonical_split is None
        else tuple(drop_ratings(p) for p in dataset.canonical_split),
        canonical_val=drop_ratings(dataset.canonical_val),
    )


@lru_cache(maxsize=2)
def _load(
    kind: str,
    data_path: str,
    test_path: str,
    val_path: str,
    item_text_path: str,
    download: bool,
    on_duplicate: str,
    split: str,
    synthetic_users: int,
    synthetic_items: int,
    seed: int,
) -> Dataset:
    if kind not in DATASETS:
        raise InputError(f"dataset: expected one of {DATASETS}, got {kind!r}")
    if kind != "csv" and (test_path or val_path):
        key = "test-path" if test_path else "val-path"
        raise InputError(f'{key}: only dataset = "csv" reads a split of your own, got {kind!r}')
    if kind == "synthetic":
        return generate_synthetic(synthetic_users, synthetic_items, seed)
    if not data_path:
        raise InputError(f"data-path: dataset = {kind!r} needs the path of its files")
    path = Path(data_path).expanduser()
    if kind == "ml-100k":
        canonical = split if split in ML_100K_SPLITS else None
        root = ensure_raw_files("ml-100k", path, download)
        return load_movielens_100k(root, canonical_split=canonical, on_duplicate=on_duplicate)
    if kind == "movielens-dat":
        root = ensure_raw_files("ml-1m", path, download) if download else path
        return load_movielens_dat(root, on_duplicate=on_duplicate)
    if kind == "lightgcn":
        return load_lightgcn(path, on_duplicate=on_duplicate)
    return load_interactions_file(
        path,
        Path(item_text_path).expanduser() if item_text_path else None,
        test_path=Path(test_path).expanduser() if test_path else None,
        val_path=Path(val_path).expanduser() if val_path else None,
        on_duplicate=on_duplicate,
    )


def split_dataset(dataset: Dataset, config: RunConfig) -> Split:
    """The train/validation/test split named by ``config.split``."""
    how = "canonical" if config.split in ML_100K_SPLITS else config.split
    return make_split(
        dataset,
        how,
        config.val_fraction,
        config.test_fraction,
        config.seed,
        config.cold_item_fraction,
        config.split_fraction_per,
    )


@lru_cache(maxsize=4096)
def load_site(config: RunConfig, site_id: int, num_sites: int) -> SiteData:
    """Site ``site_id`` of ``num_sites`` in simulation (same result in every process).

    Cached, and so is the split and partition of the whole dataset that every site's
    view is cut from: a ClientApp process handles many messages of many sites of the
    same run, and re-splitting per message was half of a small site's call.
    """
    dataset, split, site_of_user = _partitioned(config, num_sites)
    return site_view(dataset, split, site_of_user, site_id)


@lru_cache(maxsize=2)
def _partitioned(config: RunConfig, num_sites: int) -> tuple[Dataset, Split, np.ndarray]:
    dataset = load_dataset(config)
    return dataset, split_dataset(dataset, config), partition_sites(dataset, config, num_sites)


def partition_sites(dataset: Dataset, config: RunConfig, num_sites: int) -> np.ndarray:
    """The site of every user, by the configured ``partition`` scheme."""
    return partition_users(
        dataset,
        num_sites,
        scheme=config.partition,
        seed=config.seed,
        column=config.partition_column,
        alpha=config.dirichlet_alpha,
    )
