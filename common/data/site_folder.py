"""A site's data folder for deployment: what ``fedgraphrec partition`` writes, a SuperNode reads.

Layout (all text files UTF-8 CSV with a header row, original ids)::

    <site folder>/
      manifest.json              site id, number of sites, dataset, counts, and the
                                 SHA-256 of every file below
      catalogue/items.csv        item[,text]: the public catalogue, every item
      catalogue/catalogue.json   {"dataset": name, "rating-levels": [...],
                                  "user-feature-names": [...],
                                  "derived-from-data": [...]}
      train.csv                  user,item,rating[,timestamp]: the site's users only
      val.csv, test.csv          the same columns; optional
      cold.csv                   the same columns: interactions with the run's held-out
                                 cold-start items (listed in the manifest); optional
      users.csv                  user,<one column per user-feature name>; present
                                 when the catalogue names user features
      state/                     written by the site at run time (ledger, private
                                 embeddings); not part of the manifest

``fedgraphrec partition`` also writes ``<out>/catalogue/`` for the coordinator:
the server builds the global model from it (``catalogue-path``) and every site
checks that its own catalogue is the same (:meth:`Catalogue.fingerprint`).
``derived-from-data`` lists what of the catalogue a loader took from the
interactions (``Catalogue.derived_from_data``). A catalogue folder written by
hand needs only ``items.csv`` (``item`` or ``item,text``) and ``"rating-levels"``;
the ``csv`` loader takes it as its public catalogue and scale (``catalogue-path``).

A site that prepares its own folder writes the same files; the manifest's
checksums catch a file changed or truncated after it was written. A site's
users are keyed for their randomness by a hash of their original id
(:mod:`common.data.keys`), as in simulation, so a user's samples do not depend
on the other users at the site and equal the user's samples in simulation.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np

from common.data._parse import checked_levels, drop_duplicates, sorted_ids, table_interactions
from common.data.dataset import Catalogue, Dataset, Interactions
from common.data.interactions_file import parse_timestamps, read_csv
from common.data.keys import user_keys
from common.data.site import SiteData
from common.data.split import Split
from common.errors import InputError, file_error

SPLITS = ("train", "val", "test", "cold")
MANIFEST = "manifest.json"


def write_site_folders(
    dataset: Dataset, split: Split, site_of_user: np.ndarray, out: Path
) -> list[Path]:
    """Write ``<out>/catalogue`` and one ``<out>/site-<k>`` folder per site."""
    catalogue = dataset.catalogue
    write_catalogue_folder(catalogue, dataset.name, out / "catalogue")
    num_sites = int(site_of_user.max()) + 1
    folders = []
    for site in range(num_sites):
        folder = out / f"site-{site}"
        write_catalogue_folder(catalogue, dataset.name, folder / "catalogue")
        mine = site_of_user == site
        counts = {}
        parts = (split.train, split.val, split.test, split.cold)
        for name, part in zip(SPLITS, parts, strict=True):
            rows = part.select(mine[part.user])
            counts[name] = len(rows)
            if len(rows) or name == "train":
                _write_interactions(folder / f"{name}.csv", rows, dataset)
        if catalogue.user_feature_names:
            _write_users(folder / "users.csv", dataset, np.flatnonzero(mine))
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        manifest = {
            "site-id": site,
            "num-sites": num_sites,
            "dataset": dataset.name,
            "users": int(mine.sum()),
            "interactions": counts,
            "items": catalogue.num_items,
            "cold-items": [catalogue.item_ids[i] for i in split.cold_items],
            "catalogue-fingerprint": catalogue.fingerprint(),
            "sha256": {name: _sha256(folder / name) for name in files},
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
        folders.append(folder)
    return folders


def write_catalogue_folder(catalogue: Catalogue, dataset: str, folder: Path) -> None:
    """``items.csv`` and ``catalogue.json`` in ``folder`` (:func:`load_catalogue_folder`
    reads them back)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "items.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if catalogue.item_text is None:
            writer.writerow(["item"])
            writer.writerows([i] for i in catalogue.item_ids)
        else:
            writer.writerow(["item", "text"])
            writer.writerows(zip(catalogue.item_ids, catalogue.item_text, strict=True))
    description = {
        "dataset": dataset,
        "rating-levels": list(catalogue.rating_levels),
        "user-feature-names": list(catalogue.user_feature_names),
        "derived-from-data": list(catalogue.derived_from_data),
    }
    (folder / "catalogue.json").write_text(json.dumps(description, indent=2))


def _write_interactions(path: Path, rows: Interactions, dataset: Dataset) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        header = ["user", "item", "rating"] + (["timestamp"] if rows.timestamp is not None else [])
        writer.writerow(header)
        for k in range(len(rows)):
            row = [dataset.user_ids[rows.user[k]], dataset.catalogue.item_ids[rows.item[k]]]
            row.append(repr(float(rows.rating[k])))
            if rows.timestamp is not None:
                row.append(int(rows.timestamp[k]))
            writer.writerow(row)


def _write_users(path: Path, dataset: Dataset, users: np.ndarray) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["user", *dataset.catalogue.user_feature_names])
        for u in users:
            writer.writerow(
                [dataset.user_ids[u], *(repr(float(v)) for v in dataset.user_features[u])]
            )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_catalogue_folder(folder: str | Path) -> Catalogue:
    """The catalogue in ``folder``, its items in the file's order: ``items.csv``
    (``item[,text]``) and ``catalogue.json``
    with ``"rating-levels"`` (numbers) and optionally ``"user-feature-names"``,
    ``"derived-from-data"`` (lists of strings, default empty) and ``"dataset"``."""
    folder = Path(folder).expanduser()
    description_path = folder / "catalogue.json"
    if not description_path.is_file():
        raise file_error(folder, "not a catalogue folder (expected catalogue.json and items.csv)")
    try:
        description = json.loads(description_path.read_text(encoding="utf-8"))
        values = [float(v) for v in description["rating-levels"]]
        names = tuple(map(str, description.get("user-feature-names", [])))
        derived = tuple(map(str, description.get("derived-from-data", [])))
    except (ValueError, KeyError, TypeError) as error:
        raise file_error(
            description_path,
            "expected JSON with 'rating-levels' (numbers) and optionally 'user-feature-names', "
            f"'derived-from-data' (lists of strings) and 'dataset' ({error})",
        ) from None
    levels = checked_levels(values, f"{description_path}: field 'rating-levels'")
    items = read_csv(folder / "items.csv", ("item",), ("text",), None, "utf-8")
    ids, rows = items.distinct("item")
    in_file = np.argsort(rows)  # the file's order is the catalogue's (a model's item rows)
    item_ids, rows = tuple(ids[i] for i in in_file), rows[in_file]
    text = tuple(items.columns["text"][r] for r in rows) if "text" in items.columns else None
    return Catalogue(item_ids, text, levels, names, derived)


def catalogue_folder_dataset(folder: str | Path) -> str:
    """The name of the dataset a catalogue folder was written from (``"deployment"`` for
    folders written before the name was recorded)."""
    description = json.loads((Path(folder).expanduser() / "catalogue.json").read_text())
    return str(description.get("dataset", "deployment"))


def load_site_folder(folder: str | Path) -> SiteData:
    """The site in ``folder`` (layout in the module docstring), checked against its manifest."""
    folder = Path(folder).expanduser()
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise file_error(
            folder,
            f"not a site folder: expected {MANIFEST}, catalogue/, train.csv "
            "(write one with `fedgraphrec partition`)",
        )
    manifest = _read_manifest(manifest_path)
    for name, digest in manifest["sha256"].items():
        path = folder / name
        if not path.is_file():
            raise file_error(path, f"listed in {MANIFEST} but missing")
        if _sha256(path) != digest:
            raise file_error(path, f"differs from the SHA-256 in {MANIFEST}: changed since written")
    catalogue = load_catalogue_folder(folder / "catalogue")
    tables = {
        name: read_csv(
            folder / f"{name}.csv", ("user", "item", "rating"), ("timestamp",), None, "utf-8"
        )
        for name in SPLITS
        if name == "train" or (folder / f"{name}.csv").exists()
    }
    users_path = folder / "users.csv"
    features_table = (
        read_csv(users_path, ("user", *catalogue.user_feature_names), (), None, "utf-8")
        if catalogue.user_feature_names
        else None
    )
    user_ids = sorted_ids(
        {u for t in tables.values() for u in t.columns["user"]}
        | set(features_table.columns["user"] if features_table else ())
    )
    located = []
    for table in tables.values():
        rating = table.floats("rating", "a number")
        table.check_in(
            "rating", rating, catalogue.rating_levels, f"one of {catalogue.rating_levels}"
        )
        timestamp = parse_timestamps(table) if "timestamp" in table.columns else None
        located.append(
            table_interactions(
                table,
                user_ids,
                catalogue.item_ids,
                rating,
                timestamp,
                users_from=str(table.path),
                items_from=str(folder / "catalogue" / "items.csv"),
            )
        )
    parts = dict(
        zip(tables, drop_duplicates(located, "error", user_ids, catalogue.item_ids), strict=True)
    )
    features = np.zeros((len(user_ids), len(catalogue.user_feature_names)), np.float32)
    if features_table is not None:
        features_table.distinct("user")  # a user listed twice is an error
        order = features_table.codes("user", user_ids, str(users_path))
        for column, name in enumerate(catalogue.user_feature_names):
            features[order, column] = features_table.floats(name, "a number")
        missing = set(user_ids) - set(features_table.columns["user"])
        if missing:
            raise file_error(users_path, f"no features for user(s) {sorted(missing)[:5]}")
    return SiteData(
        site_id=int(manifest["site-id"]),
        catalogue=catalogue,
        user_keys=user_keys(user_ids),
        user_features=features,
        train=parts["train"],
        val=parts.get("val", Interactions.empty()),
        test=parts.get("test", Interactions.empty()),
        cold=parts.get("cold", Interactions.empty()),
        cold_items=np.array(
            [catalogue.item_ids.index(i) for i in manifest.get("cold-items", [])], dtype=np.int64
        ),
    )


def site_folder_id(folder: str | Path) -> int | None:
    """The site id a site folder's manifest records; None where it cannot be read."""
    try:
        return int(_read_manifest(Path(folder).expanduser() / MANIFEST)["site-id"])
    except (OSError, InputError):
        return None


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        int(manifest["site-id"])
        dict(manifest["sha256"])
    except (ValueError, KeyError, TypeError) as error:
        raise file_error(path, f"expected JSON with 'site-id' and 'sha256' ({error})") from None
    return manifest
