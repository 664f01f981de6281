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

The rating scale (``Catalogue.rating_levels``) is public schema, shared by every
site: it is ``rating_levels`` when given (every rating must be one of them),
else the sorted distinct ratings present in the files.

A split of one's own (``test-path``, optionally ``val-path``; same format and
columns): the interactions file is then the training set and the other files
are kept as given, as the dataset's canonical split. Their users must have
training interactions and their items must be in the catalogue.

The optional item-text file (same delimiter rules) has the header ``item,text``
and one row per item: it defines the catalogue, so every item of the
interactions must be in it, and items without interactions are kept. Without
it, the catalogue is the set of items in the interactions and has no text.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from common.data._parse import (
    Table,
    check_on_duplicate,
    drop_duplicates,
    is_integer,
    make_table,
    read_text,
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
    test_path: str | Path | None = None,
    val_path: str | Path | None = None,
    delimiter: str | None = None,
    encoding: str = "utf-8",
    rating_levels: Sequence[float] | None = None,
    on_duplicate: str = "error",
    name: str | None = None,
) -> Dataset:
    """Load interactions (and optionally item texts) from CSV/TSV files.

    See the module docstring for the format. ``test_path`` and ``val_path``
    (optional, same format) give a split of one's own: ``path`` is then the
    training set, and ``Dataset.canonical_split`` / ``canonical_val`` hold the
    parts as given. Their users must have training interactions in ``path``,
    their items must be in the catalogue, and they need the same optional
    columns as ``path``. ``on_duplicate`` decides what a repeated (user, item)
    pair does, within a file or across the files: ``"error"``, or
    ``"keep-latest"`` which keeps the row with the latest timestamp (ties, or no
    timestamp column: the later line, ``path`` before ``val_path`` before
    ``test_path``). ``name`` defaults to the file name without its extension.
    """
    check_on_duplicate(on_duplicate)
    paths = [Path(p) for p in (path, val_path, test_path) if p is not None]
    tables = [
        read_csv(p, ("user", "item"), ("rating", "timestamp"), delimiter, encoding) for p in paths
    ]
    train = tables[0]
    for table in tables[1:]:
        _check_same_columns(train, table)
    ratings, levels = _ratings(tables, _levels(rating_levels))
    if item_text_path is None:
        item_ids, item_text = sorted_ids(train.columns["item"]), None
        items_from = f"the training data {train.path}"
    else:
        texts = read_csv(Path(item_text_path), ("item", "text"), (), delimiter, encoding)
        item_ids, rows = texts.distinct("item")
        item_text = tuple(texts.columns["text"][row] for row in rows)
        items_from = f"the item-text file {item_text_path}"
    user_ids = sorted_ids(train.columns["user"])
    located = [
        table_interactions(
            table,
            user_ids,
            item_ids,
            rating,
            parse_timestamps(table) if "timestamp" in table.columns else None,
            users_from=f"the training data {train.path}",
            items_from=items_from,
        )
        for table, rating in zip(tables, ratings, strict=True)
    ]
    parts = drop_duplicates(located, on_duplicate, user_ids, item_ids)
    return Dataset(
        name=name or train.path.stem,
        catalogue=Catalogue(item_ids=item_ids, item_text=item_text, rating_levels=levels),
        user_ids=user_ids,
        interactions=Interactions.concat(parts),
        user_features=np.zeros((len(user_ids), 0), dtype=np.float32),
        canonical_split=None if test_path is None else (parts[0], parts[-1]),
        canonical_val=None if val_path is None else parts[1],
    )


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
    tables: list[Table], levels: tuple[float, ...] | None
) -> tuple[list[np.ndarray], tuple[float, ...]]:
    """Each table's ratings and the rating scale (``levels``, else the ratings present).

    Without a rating column every rating is 1.0 and the scale is ``(1.0,)``.
    """
    if "rating" not in tables[0].columns:
        if levels is not None:
            raise InputError(
                f"rating levels: {tables[0].path} has no rating column to check them against"
            )
        return [np.ones(len(table)) for table in tables], (1.0,)
    ratings = [table.floats("rating", "a number") for table in tables]
    if levels is None:
        levels = tuple(np.unique(np.concatenate(ratings)).tolist())
    for table, rating in zip(tables, ratings, strict=True):
        table.check_in("rating", rating, levels, f"a rating in {levels}")
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


def _levels(rating_levels: Sequence[float] | None) -> tuple[float, ...] | None:
    if rating_levels is None:
        return None
    levels = tuple(sorted({float(level) for level in rating_levels}))
    if not levels or not np.isfinite(levels).all():
        raise InputError(
            f"rating levels: expected a non-empty list of finite numbers, got {rating_levels!r}"
        )
    return levels


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
