"""Data: loaders (one module per format), splits, partitioning into sites.

:func:`load_dataset` picks the loader named by the ``dataset`` key;
:func:`load_site` gives one site its users in simulation, where every site
derives the same split and partition from the shared configuration and seed.

The catalogue and the rating scale reach every user's release, so they must be
public: MovieLens, LightGCN (with ``item_list.txt``) and the synthetic data have
their published ones, and ``csv`` data takes them from ``item-text-path`` or
``catalogue-path`` and ``rating-scale`` (or the catalogue folder's levels). A
loader that takes them from the interactions instead records it in
``Catalogue.derived_from_data``: allowed without DP, an error naming the key to
set under DP. ``rating-scale`` given for a dataset with a published scale must
equal it.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path

import numpy as np

from common.config import RunConfig
from common.data._parse import ITEM_IDS, RATING_SCALE, parse_rating_scale, show_levels
from common.data.dataset import Catalogue, Dataset, Interactions
from common.data.download import ensure_raw_files
from common.data.interactions_file import load_interactions_file
from common.data.lightgcn import load_lightgcn
from common.data.movielens import ML_100K_SPLITS, load_movielens_100k, load_movielens_dat
from common.data.partition import partition_users
from common.data.site import SiteData, site_view
from common.data.site_folder import load_catalogue_folder
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

PUBLIC_INPUTS = {
    ("csv", ITEM_IDS): (
        "item-text-path: dp = true needs the public catalogue of csv data, e.g. "
        'item-text-path = "/data/items.csv" (header item or item,text; one row per item) or '
        'catalogue-path = "/data/catalogue" (items.csv and catalogue.json)'
    ),
    ("csv", RATING_SCALE): (
        "rating-scale: dp = true needs the public rating scale of csv data, e.g. "
        'rating-scale = "1..5" (or "0.5..5 step 0.5", or "1,2,3,4,5")'
    ),
    ("lightgcn", ITEM_IDS): (
        "data-path: dp = true needs the public catalogue of lightgcn data, "
        "{data_path}/item_list.txt, which is missing (header org_id remap_id, then one "
        'line "original-id index" per item, e.g. "a 0")'
    ),
}
"""Under DP, what each loader's ``Catalogue.derived_from_data`` entry asks the user to give."""


def load_dataset(config: RunConfig) -> Dataset:
    """The dataset named by ``config.dataset``, read from ``config.data_path``; with
    ``implicit = true`` every interaction becomes plain implicit feedback.

    Under DP (``config.dp``), a catalogue or scale taken from the interactions
    (``Catalogue.derived_from_data``) is an :class:`InputError` naming the key that
    gives it, with an example.
    """
    dataset = _load(
        config.dataset,
        config.data_path,
        config.test_path,
        config.val_path,
        config.item_text_path,
        config.catalogue_path,
        config.rating_scale,
        config.download,
        config.on_duplicate,
        config.split,
        config.synthetic_users,
        config.synthetic_items,
        config.seed,
    )
    if config.implicit:
        dataset = as_implicit(dataset)
    derived = dataset.catalogue.derived_from_data
    if config.dp and derived:
        raise InputError(_needs_public_inputs(config, derived))
    return dataset


def _needs_public_inputs(config: RunConfig, derived: tuple[str, ...]) -> str:
    """The message for a run under DP whose catalogue has ``derived`` parts."""
    if config.catalogue_path and config.dataset == "csv":
        return (
            f"catalogue-path: dp = true needs a public catalogue, and "
            f"{config.catalogue_path}/catalogue.json records its {' and '.join(derived)} as "
            '"derived-from-data"; write the folder from public sources'
        )
    needs = [
        PUBLIC_INPUTS[config.dataset, what].format(data_path=config.data_path) for what in derived
    ]
    return "; ".join(needs) + (
        f"; the {' and '.join(derived)} present in the data are users' data "
        "(only dp = false takes them from the data)"
    )


def as_implicit(dataset: Dataset) -> Dataset:
    """Every interaction as implicit feedback: rating 1.0, one rating level (so no
    longer a scale derived from the data)."""

    def drop_ratings(part: Interactions | None) -> Interactions | None:
        if part is None:
            return None
        return Interactions(part.user, part.item, np.ones(len(part), np.float32), part.timestamp)

    return dataclasses.replace(
        dataset,
        catalogue=dataclasses.replace(
            dataset.catalogue,
            rating_levels=(1.0,),
            derived_from_data=tuple(
                what for what in dataset.catalogue.derived_from_data if what != RATING_SCALE
            ),
        ),
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
    catalogue_path: str,
    rating_scale: str,
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
    scale = parse_rating_scale(rating_scale) if rating_scale else None
    if kind == "synthetic":
        dataset = generate_synthetic(synthetic_users, synthetic_items, seed)
    elif not data_path:
        raise InputError(f"data-path: dataset = {kind!r} needs the path of its files")
    elif kind == "csv":
        return load_interactions_file(
            _path(data_path),
            _path(item_text_path),
            catalogue=load_catalogue_folder(catalogue_path) if catalogue_path else None,
            test_path=_path(test_path),
            val_path=_path(val_path),
            rating_levels=scale,
            on_duplicate=on_duplicate,
        )
    else:
        dataset = _load_published(kind, _path(data_path), download, on_duplicate, split)
    levels = dataset.catalogue.rating_levels
    if scale is not None and scale != levels:
        raise InputError(
            f"rating-scale: dataset = {kind!r} has the published scale {show_levels(levels)}, "
            f"got {rating_scale!r}; leave rating-scale empty"
        )
    return dataset


def _load_published(
    kind: str, path: Path, download: bool, on_duplicate: str, split: str
) -> Dataset:
    """MovieLens or LightGCN files: formats that publish the catalogue and the scale."""
    if kind == "ml-100k":
        canonical = split if split in ML_100K_SPLITS else None
        root = ensure_raw_files("ml-100k", path, download)
        return load_movielens_100k(root, canonical_split=canonical, on_duplicate=on_duplicate)
    if kind == "movielens-dat":
        root = ensure_raw_files("ml-1m", path, download) if download else path
        return load_movielens_dat(root, on_duplicate=on_duplicate)
    return load_lightgcn(path, on_duplicate=on_duplicate)


def _path(text: str) -> Path | None:
    """A path key's value as a path (``~`` expanded); ``None`` when the key is empty."""
    return Path(text).expanduser() if text else None


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
