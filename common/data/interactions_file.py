"""Generic interaction files: CSV or TSV with a header row that names the columns.

Format of the interactions file:

* Delimiter: ``,`` for ``.csv``, a tab for ``.tsv`` and ``.tab``; for any other
  extension it must be given (the ``delimiter`` argument of the Python
  functions, which when given applies to every file; a run's configuration
  has no such key, so rename such a file). Fields are parsed by :mod:`csv`
  (Excel dialect), so a field holding the delimiter, a quote or a line break
  is written in double quotes, with ``""`` for a quote inside.
* Header: required. Column names are case-insensitive (matched to the names
  the reader expects, e.g. ``gender:F``) and trimmed of
  surrounding spaces: ``user`` and ``item`` are required, ``rating`` and
  ``timestamp`` optional, and any other column is an error (to catch typos).
* Values are trimmed of surrounding spaces. User and item ids are non-empty
  strings, re-indexed in numeric order when all are integers, else in string
  order.
* ``rating``: a finite number. Without this column the data is implicit
  feedback: every rating is 1.0 and the scale is ``(1.0,)``.
* ``timestamp``: integer seconds since the epoch, or an ISO 8601 date or
  date-time as read by :meth:`datetime.datetime.fromisoformat` (e.g.
  ``2024-05-01``, ``2024-05-01T12:30:00``, ``2024-05-01 12:30:00+02:00``);
  date-times without an offset are taken as UTC and fractions of a second
  are dropped.
* Blank lines are passed over. Text is decoded with ``encoding``.

The catalogue and the rating scale are public, shared by every site, and under DP
they must come from no user's data: one user who rated 10 on a 1..5 file, or
rated an item nobody else has, would otherwise change every other user's
release. They are, in this order:

* catalogue: the item file (``item_text_path``, key ``item-text-path``; same
  delimiter rules, header ``item`` or ``item,text``, one row per item), or a
  catalogue folder (``catalogue``, key ``catalogue-path``, as read by
  :func:`common.data.site_folder.load_catalogue_folder`; taken as it is, so
  that the server's catalogue and the sites' are the same). Every item of the
  interactions must be in it; items without interactions are kept. Without
  either, the catalogue is the set of items in the training file, with no text.
* scale: ``rating_levels`` (key ``rating-scale``, see
  :func:`common.data._parse.parse_rating_scale`), or the catalogue folder's
  ``rating-levels`` (if both are given they must be equal). Every rating must be
  on it. Without either, the scale is the sorted distinct ratings present. A
  file without a rating column is implicit feedback and needs no scale.

What was taken from the interactions is recorded in
``Catalogue.derived_from_data``; :func:`common.data.load_dataset` refuses it under
DP and allows it without.

A split of one's own (``test-path``, optionally ``val-path``; same format and
columns): the interactions file is then the training set and the other files
are kept as given, as the dataset's canonical split. Their users and items
need not be in the training file: a user who is only there is a new user, with
no training interactions, and an item is new when no training row has it (it
must still be in the catalogue when one is given: the item-text file or the
catalogue folder; without one the catalogue is every item of the files). Runs
score such rows, and report test metrics over all rows and over the warm ones
(``test-...-warm``, ``common.metric_release``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from common.data._parse import (
    ITEM_IDS,
    RATING_SCALE,
    Table,
    check_on_duplicate,
    checked_levels,
    drop_duplicates,
    is_integer,
    make_table,
    read_text,
    show_levels,
    sorted_ids,
    table_interactions,
)
from common.data.dataset import Catalogue, Dataset, Interactions
from common.errors import InputError, file_error

DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
_TIMESTAMP = "integer seconds since the epoch or an ISO 8601 date/time"


def load_interactions_file(
    path: str | Path,
    item_text_path: str | Path | None = None,
    *,
    catalogue: Catalogue | None = None,
    test_path: str | Path | None = None,
    val_path: str | Path | None = None,
    delimiter: str | None = None,
    encoding: str = "utf-8",
    rating_levels: Sequence[float] | None = None,
    on_duplicate: str = "error",
    name: str | None = None,
) -> Dataset:
    """Load interactions (and optionally the public catalogue and scale) from CSV/TSV files.

    See the module docstring for the format and for where the catalogue
    (``item_text_path`` or ``catalogue``, not both) and the scale
    (``rating_levels``) come from. ``test_path`` and ``val_path``
    (optional, same format) give a split of one's own: ``path`` is then the
    training set, and ``Dataset.canonical_split`` / ``canonical_val`` hold the
    parts as given. Their users and items may be new (module docstring); they
    need the same optional columns as ``path``. ``on_duplicate`` decides what a
    repeated (user, item) pair does, within a file or across the files: ``"error"``, or
    ``"keep-latest"`` which keeps the row with the latest timestamp (ties, or no
    timestamp column: the later line, ``path`` before ``val_path`` before
    ``test_path``). ``name`` defaults to the file name without its extension.
    """
    check_on_duplicate(on_duplicate)
    if item_text_path is not None and catalogue is not None:
        raise InputError("item-text-path, catalogue-path: each gives the catalogue; give one")
    paths = [Path(p) for p in (path, val_path, test_path) if p is not None]
    tables = [
        read_csv(p, ("user", "item"), ("rating", "timestamp"), delimiter, encoding) for p in paths
    ]
    train = tables[0]
    for table in tables[1:]:
        _check_same_columns(train, table)
    levels, scale_from = _given_scale(rating_levels, catalogue)
    ratings, scale = _ratings(tables, levels, scale_from)
    derived_scale = levels is None and "rating" in train.columns
    catalogue, items_from = _catalogue(
        tables, item_text_path, catalogue, scale, derived_scale, delimiter, encoding
    )
    user_ids = sorted_ids(user for table in tables for user in table.columns["user"])
    located = [
        table_interactions(
            table,
            user_ids,
            catalogue.item_ids,
            rating,
            parse_timestamps(table) if "timestamp" in table.columns else None,
            users_from="the data files",
            items_from=items_from,
        )
        for table, rating in zip(tables, ratings, strict=True)
    ]
    parts = drop_duplicates(located, on_duplicate, user_ids, catalogue.item_ids)
    return Dataset(
        name=name or train.path.stem,
        catalogue=catalogue,
        user_ids=user_ids,
        interactions=Interactions.concat(parts),
        user_features=np.zeros((len(user_ids), 0), dtype=np.float32),
        canonical_split=None if test_path is None else (parts[0], parts[-1]),
        canonical_val=None if val_path is None else parts[1],
    )


def _given_scale(
    rating_levels: Sequence[float] | None, catalogue: Catalogue | None
) -> tuple[tuple[float, ...] | None, str]:
    """The public scale (``rating_levels``, else the catalogue folder's) and the key that
    gives it; ``None`` when neither gives one. Both given must be equal."""
    levels = None if rating_levels is None else checked_levels(rating_levels, "rating-scale")
    if catalogue is None:
        return levels, "rating-scale"
    if levels is not None and levels != catalogue.rating_levels:
        raise InputError(
            f"rating-scale: {show_levels(levels)} differs from the rating-levels "
            f"{show_levels(catalogue.rating_levels)} of the catalogue (catalogue-path); "
            "give one scale"
        )
    return catalogue.rating_levels, "catalogue-path"


def _catalogue(
    tables: list[Table],
    item_text_path: str | Path | None,
    folder: Catalogue | None,
    levels: tuple[float, ...],
    derived_scale: bool,
    delimiter: str | None,
    encoding: str,
) -> tuple[Catalogue, str]:
    """The catalogue, and where its items come from (for messages): the catalogue
    folder's as it is, else the item file's, else the items of ``tables``; what came from
    the interactions (the items, the scale ``levels`` when ``derived_scale``) is
    recorded in ``derived_from_data``."""
    if folder is not None:
        if folder.user_feature_names:
            raise InputError(
                f"catalogue-path: the catalogue names {len(folder.user_feature_names)} user "
                "features, and csv data has none"
            )
        return folder, "the catalogue of catalogue-path"
    derived = (RATING_SCALE,) if derived_scale else ()
    if item_text_path is None:
        item_ids = sorted_ids(item for table in tables for item in table.columns["item"])
        catalogue = Catalogue(item_ids, None, levels, derived_from_data=(ITEM_IDS, *derived))
        return catalogue, "the data files"
    items = read_csv(Path(item_text_path), ("item",), ("text",), delimiter, encoding)
    item_ids, rows = items.distinct("item")
    text = tuple(items.columns["text"][row] for row in rows) if "text" in items.columns else None
    catalogue = Catalogue(item_ids, text, levels, derived_from_data=derived)
    return catalogue, f"the item-text file {item_text_path}"


def _check_same_columns(train: Table, other: Table) -> None:
    """Raise unless ``other`` has the optional columns that ``train`` has, and no others."""
    for column in ("rating", "timestamp"):
        if (column in train.columns) != (column in other.columns):
            has, lacks = (other, train) if column in other.columns else (train, other)
            raise file_error(
                other.path,
                f"{has.path} has a {column} column and {lacks.path} has none; "
                "the files of one split need the same columns",
                field=column,
            )


def _ratings(
    tables: list[Table], levels: tuple[float, ...] | None, scale_from: str
) -> tuple[list[np.ndarray], tuple[float, ...]]:
    """Each table's ratings, checked to be on the scale ``levels`` (given by
    ``scale_from``), and the scale: ``levels``, else the sorted distinct ratings present.

    Without a rating column every rating is 1.0 and the scale is ``(1.0,)``.
    """
    if "rating" not in tables[0].columns:
        if levels not in (None, (1.0,)):
            raise InputError(
                f"{scale_from}: {tables[0].path} has no rating column (implicit feedback "
                f"needs no scale), got the scale {show_levels(levels)}"
            )
        return [np.ones(len(table)) for table in tables], (1.0,)
    ratings = [table.floats("rating", "a number") for table in tables]
    if levels is None:
        return ratings, tuple(np.unique(np.concatenate(ratings)).tolist())
    for table, rating in zip(tables, ratings, strict=True):
        expected = f"a rating on the scale {show_levels(levels)} ({scale_from})"
        table.check_in("rating", rating, levels, expected)
    return ratings, levels


def read_csv(
    path: Path,
    required: Sequence[str],
    optional: Sequence[str],
    delimiter: str | None,
    encoding: str,
) -> Table:
    """Read a delimited file whose header names ``required`` and some of ``optional``.

    A field of a ``required`` column may not be empty.
    """
    if path.is_dir():
        raise file_error(path, f"is a folder; expected a {', '.join(DELIMITERS)} file")
    if delimiter is None:
        if path.suffix.lower() not in DELIMITERS:
            raise file_error(
                path,
                f"cannot tell the delimiter from the extension {path.suffix!r}; "
                "rename the file to .csv (comma-separated) or .tsv (tab-separated)",
            )
        delimiter = DELIMITERS[path.suffix.lower()]
    text = read_text(
        path, (encoding,), f"Save the file as {encoding} (e.g. iconv -f latin-1 -t {encoding})."
    )
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows: list[list[str]] = []
    line: list[int] = []
    start = 1
    try:
        for record in reader:
            if record and not (len(record) == 1 and record[0].isspace()):
                rows.append([field.strip() for field in record])
                line.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise file_error(path, f"malformed {delimiter!r}-delimited text: {e}", line=start) from None
    columns = _header(path, rows[0], line[0], required, optional)
    table = make_table(path, columns, rows[1:], line[1:], repr(delimiter))
    for column in required:
        if "" in table.columns[column]:
            raise table.error(table.columns[column].index(""), column, "expected a value, got ''")
    return table


def _header(
    path: Path, names: list[str], line: int, required: Sequence[str], optional: Sequence[str]
) -> list[str]:
    """The column names of a header row, matched case-insensitively to the allowed ones.

    Returns each column's name as spelled in ``required`` or ``optional`` (e.g.
    ``GENDER:f`` in the file is column ``gender:F``).
    """
    exact = {*required, *optional}
    folded = {name.lower(): name for name in exact}
    columns = [name if name in exact else folded.get(name.lower(), name) for name in names]
    expected = f"expected the columns {', '.join(required)}" + (
        f" and optionally {', '.join(optional)}" if optional else ""
    )
    unknown = [name for name in names if name not in exact and name.lower() not in folded]
    if unknown:
        raise file_error(
            path, f"unknown column(s) {unknown}; {expected}", line=line, field=unknown[0]
        )
    for index, column in enumerate(columns):
        if column in columns[:index]:
            raise file_error(path, "column given twice", line=line, field=names[index])
    missing = [column for column in required if column not in columns]
    if missing:
        raise file_error(path, f"missing from the header; {expected}", line=line, field=missing[0])
    return columns


def parse_timestamps(table: Table) -> np.ndarray:
    """The ``timestamp`` column as integer seconds (see the module docstring)."""
    values = table.columns["timestamp"]
    try:
        return np.array(values, dtype=np.int64)
    except (ValueError, OverflowError):
        return np.fromiter(
            (_seconds(table, row, value) for row, value in enumerate(values)),
            dtype=np.int64,
            count=len(values),
        )


def _seconds(table: Table, row: int, value: str) -> int:
    if is_integer(value):
        return int(value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise table.error(row, "timestamp", f"expected {_TIMESTAMP}, got {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())
