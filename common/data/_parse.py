"""Parsing helpers shared by the loaders: text decoding, delimited tables that
remember line numbers, re-indexing of original ids, the duplicate policy, and the
public rating scale (the ``rating-scale`` key).

Every problem is reported as an :class:`~common.errors.InputError` that names the
file and, where they apply, the 1-based line and the field. Lines that hold only whitespace carry no
data and are passed over (they still count in line numbers); a final newline is
optional. ``\\r\\n`` line ends are accepted.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data.dataset import Interactions
from common.errors import InputError, file_error

logger = logging.getLogger(__name__)

ON_DUPLICATE = ("error", "keep-latest")
MAX_RATING_LEVELS = 1000
"""The most levels a rating scale may have (``"1..1000000"`` is a typo, not a scale)."""
RATING_SCALE_FORMS = (
    '"a..b" (the integers from a to b, e.g. "1..5"), "a..b step s" (e.g. "0.5..5 step 0.5") '
    'or a list (e.g. "1,2,3,4,5")'
)

ITEM_IDS, RATING_SCALE = "item ids", "rating scale"
"""What a loader records in ``Catalogue.derived_from_data`` when it takes them from the
interactions."""

_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_RANGE = re.compile(rf"\s*({_NUMBER})\s*\.\.\s*({_NUMBER})(?:\s+step\s+({_NUMBER}))?\s*")


def check_on_duplicate(on_duplicate: str) -> None:
    """Raise unless ``on_duplicate`` names a policy in :data:`ON_DUPLICATE`."""
    if on_duplicate not in ON_DUPLICATE:
        raise InputError(f"on-duplicate: expected one of {ON_DUPLICATE}, got {on_duplicate!r}")


def parse_rating_scale(text: str) -> tuple[float, ...]:
    """The levels of the public rating scale that the ``rating-scale`` key ``text`` names.

    Forms: ``"a..b"``, the integers from ``a`` to ``b`` (``"1..5"``); ``"a..b step s"``,
    ``a``, ``a + s``, ... up to ``b``, which must be on that grid (``"0.5..5 step
    0.5"``); or a comma-separated list of numbers (``"1,2,3,4,5"``). A scale has two
    levels at least (one level is implicit feedback, which needs no scale) and at most
    :data:`MAX_RATING_LEVELS`. Anything else is an :class:`InputError` that names the
    key, the value and the accepted forms.
    """

    def error(problem: str) -> InputError:
        return InputError(f"rating-scale: {problem}; expected {RATING_SCALE_FORMS}, got {text!r}")

    match = _RANGE.fullmatch(text)
    if match is None:
        try:
            levels = tuple(sorted(float(value) for value in text.split(",")))
        except ValueError:
            raise error("neither a range nor a list of numbers") from None
    else:
        start, end = float(match[1]), float(match[2])
        if match[3] is None and not (start.is_integer() and end.is_integer()):
            raise error("a range without a step needs whole-number ends")
        step = 1.0 if match[3] is None else float(match[3])
        if not (step > 0 and start < end < math.inf):
            raise error("a range needs a start below its end and a positive step")
        count = (end - start) / step
        if count >= MAX_RATING_LEVELS:
            raise error(f"more than {MAX_RATING_LEVELS} levels")
        if not math.isclose(count, round(count), abs_tol=1e-9):
            raise error("the end is not on the grid of the step")
        levels = tuple(round(start + k * step, 12) for k in range(round(count) + 1))
    problem = _scale_problem(levels)
    if problem is None and len(levels) < 2:
        problem = "a scale has two levels at least (implicit feedback needs no scale)"
    if problem is not None:
        raise error(problem)
    return levels


def checked_levels(values: Sequence[float], where: str) -> tuple[float, ...]:
    """``values`` sorted, as a rating scale: 1 to :data:`MAX_RATING_LEVELS` distinct
    finite numbers; otherwise an :class:`InputError` that starts with ``where``."""
    levels = tuple(sorted(float(value) for value in values))
    problem = _scale_problem(levels)
    if problem is not None:
        raise InputError(f"{where}: {problem}, got {list(values)!r}")
    return levels


def _scale_problem(levels: tuple[float, ...]) -> str | None:
    """What makes sorted ``levels`` no rating scale, or ``None``."""
    if not levels:
        return "no level"
    if len(levels) > MAX_RATING_LEVELS:
        return f"more than {MAX_RATING_LEVELS} levels"
    if not all(map(math.isfinite, levels)):
        return "a level is not a finite number"
    if len(set(levels)) < len(levels):
        return "a level is listed twice"
    return None


def show_levels(levels: Sequence[float]) -> str:
    """A rating scale as it reads in a message: ``1, 2, 3, 4, 5``."""
    return ", ".join(f"{level:g}" for level in levels)


def read_text(path: Path, encodings: Sequence[str], remedy: str = "") -> str:
    """The text of ``path`` decoded with the first of ``encodings`` that decodes it.

    ``remedy`` tells the reader what to do about undecodable bytes (e.g. which
    option selects another encoding). A missing or empty file is an error; a
    leading byte-order mark is removed.
    """
    if not path.is_file():
        raise file_error(path, "file not found")
    data = path.read_bytes()
    for encoding in encodings[:-1]:
        try:
            return _nonempty(path, data.decode(encoding))
        except UnicodeDecodeError:
            continue
    try:
        return _nonempty(path, data.decode(encodings[-1]))
    except UnicodeDecodeError as e:
        tried = " or ".join(encodings)
        raise file_error(
            path,
            f"byte 0x{data[e.start]:02x} cannot be decoded as {tried}. {remedy}".strip(),
            line=data.count(b"\n", 0, e.start) + 1,
        ) from None
    except LookupError:
        raise InputError(f"encoding: unknown text encoding {encodings[-1]!r}") from None


def _nonempty(path: Path, text: str) -> str:
    if not text.strip():
        raise file_error(path, "file is empty")
    return text.removeprefix("\ufeff")


def numbered_lines(text: str) -> tuple[list[int], list[str]]:
    """The 1-based numbers and contents of the lines of ``text`` that are not blank."""
    lines = text.replace("\r\n", "\n").split("\n")
    keep = [n for n, line in enumerate(lines) if line and not line.isspace()]
    return [n + 1 for n in keep], [lines[n] for n in keep]


def is_integer(text: str) -> bool:
    """True when ``text`` is a decimal integer such as ``"42"`` or ``"-7"``."""
    return _INTEGER.fullmatch(text) is not None


def sorted_ids(ids: Iterable[str]) -> tuple[str, ...]:
    """The distinct ``ids`` in index order: numeric when all are integers, else as strings."""
    distinct = set(ids)
    if all(is_integer(i) for i in distinct):
        return tuple(sorted(distinct, key=lambda i: (int(i), i)))
    return tuple(sorted(distinct))


@dataclass(frozen=True)
class Table:
    """The rows of a delimited text file, one list of strings per named column.

    Attributes:
        path: the file, for error messages.
        columns: column name -> the value of each row.
        line: the 1-based line of each row.
    """

    path: Path
    columns: dict[str, list[str]]
    line: list[int]

    def __len__(self) -> int:
        return len(self.line)

    def error(self, row: int, field: str | None, problem: str) -> InputError:
        """An :class:`InputError` located at row ``row`` and ``field``."""
        return file_error(self.path, problem, line=self.line[row], field=field)

    def ints(self, column: str, expected: str) -> np.ndarray:
        """``column`` as int64; a value that is not an integer is an error."""
        values = self.columns[column]
        try:
            return np.array(values, dtype=np.int64)
        except (ValueError, OverflowError):
            row = first_non_integer(values)
            raise self.error(row, column, f"expected {expected}, got {values[row]!r}") from None

    def floats(self, column: str, expected: str) -> np.ndarray:
        """``column`` as float64; a value that is not a finite number is an error."""
        try:
            numbers = np.array(self.columns[column], dtype=np.float64)
        except ValueError:
            numbers = np.array([_float_or_nan(v) for v in self.columns[column]])
        self.check(column, np.isfinite(numbers), expected)
        return numbers

    def check(self, column: str, valid: np.ndarray, expected: str) -> None:
        """Raise at the first row where ``valid`` is false, quoting its ``column`` value."""
        bad = np.flatnonzero(~valid)
        if bad.size:
            row = int(bad[0])
            raise self.error(row, column, f"expected {expected}, got {self.columns[column][row]!r}")

    def check_in(self, column: str, values: np.ndarray, allowed: Sequence, expected: str) -> None:
        """Raise at the first row whose entry of ``values`` is not one of ``allowed``."""
        self.check(column, np.isin(values, allowed), expected)

    def distinct(self, column: str) -> tuple[tuple[str, ...], np.ndarray]:
        """The ids in ``column`` in index order and the row of each; a repeated id is an error."""
        row_of: dict[str, int] = {}
        for row, value in enumerate(self.columns[column]):
            if value in row_of:
                again = f"{value!r} is listed again (first on line {self.line[row_of[value]]})"
                raise self.error(row, column, again)
            row_of[value] = row
        ids = sorted_ids(row_of)
        return ids, np.array([row_of[i] for i in ids], dtype=np.int64)

    def codes(self, column: str, ids: tuple[str, ...], known_from: str) -> np.ndarray:
        """Each row's index in ``ids``; a value missing from ``ids`` is an error.

        ``known_from`` names where the ids come from, e.g. ``"u.item"``.
        """
        index = {value: i for i, value in enumerate(ids)}
        values = self.columns[column]
        codes = list(map(index.get, values))
        if None in codes:
            row = codes.index(None)
            raise self.error(row, column, f"{values[row]!r} is not in {known_from}")
        return np.array(codes, dtype=np.int64)


def first_non_integer(values: Sequence[str]) -> int:
    """The index of the first of ``values`` that int64 conversion rejects (or ``len``)."""
    for index, value in enumerate(values):
        try:
            np.int64(value)
        except (ValueError, OverflowError):
            return index
    return len(values)


def _float_or_nan(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def read_table(
    path: Path,
    separator: str | None,
    columns: Sequence[str],
    *,
    encodings: Sequence[str],
    remedy: str = "",
    header: bool = False,
) -> Table:
    """Read a file of ``separator``-separated ``columns`` (``None``: runs of whitespace).

    With ``header``, the first line must list exactly ``columns``. A row with a
    different number of fields is an error, and so is a file without rows.
    """
    line, rows = numbered_lines(read_text(path, encodings, remedy))
    shown = "whitespace" if separator is None else repr(separator)
    if header:
        if rows[0].split(separator) != list(columns):
            raise file_error(
                path, f"expected the header {' '.join(columns)!r}, got {rows[0]!r}", line=line[0]
            )
        line, rows = line[1:], rows[1:]
    return make_table(path, columns, [row.split(separator) for row in rows], line, shown)


def make_table(
    path: Path, columns: Sequence[str], rows: list[list[str]], line: list[int], separator: str
) -> Table:
    """The :class:`Table` of ``rows`` (each a list of fields, read from ``line``).

    A row with a number of fields other than ``len(columns)`` is an error, and
    so is an empty ``rows``. ``separator`` describes the separator for messages.
    """
    if not rows:
        raise file_error(path, "no data rows after the header")
    counts = list(map(len, rows))
    if counts.count(len(columns)) != len(rows):
        row = next(r for r, count in enumerate(counts) if count != len(columns))
        missing = columns[counts[row]] if counts[row] < len(columns) else None
        raise file_error(
            path,
            f"expected {len(columns)} fields separated by {separator} "
            f"({', '.join(columns)}), got {counts[row]}",
            line=line[row],
            field=missing,
        )
    return Table(path, {c: [fields[k] for fields in rows] for k, c in enumerate(columns)}, line)


@dataclass(frozen=True)
class Located:
    """Interactions read from one file, with the line each came from."""

    path: Path
    interactions: Interactions
    line: np.ndarray


def drop_duplicates(
    parts: Sequence[Located],
    on_duplicate: str,
    user_ids: tuple[str, ...],
    item_ids: tuple[str, ...],
) -> list[Interactions]:
    """Apply the duplicate policy to the (user, item) pairs of ``parts`` taken together.

    Rows are ordered as given: part by part, line by line. ``"error"`` raises
    naming both lines of the first repeated pair; ``"keep-latest"`` keeps, for
    each pair, the row with the latest timestamp (ties and missing timestamps:
    the later row) and logs how many rows it replaced. Returns each part's
    remaining interactions.
    """
    whole = Interactions.concat([p.interactions for p in parts])
    key = whole.user * len(item_ids) + whole.item
    position = np.arange(len(key))
    time = whole.timestamp if whole.timestamp is not None else np.zeros_like(key)
    order = np.lexsort((position, time, key))
    repeated = np.flatnonzero(key[order][1:] == key[order][:-1])
    if repeated.size == 0:
        return [p.interactions for p in parts]
    starts = np.cumsum([0] + [len(p.interactions) for p in parts])

    def where(row: int) -> tuple[Located, int]:
        part = int(np.searchsorted(starts, row, side="right")) - 1
        return parts[part], int(parts[part].line[row - starts[part]])

    if on_duplicate == "error":
        earlier = np.minimum(order[repeated], order[repeated + 1])
        later = np.maximum(order[repeated], order[repeated + 1])
        first = int(np.argmin(later))
        part, line = where(int(later[first]))
        other, other_line = where(int(earlier[first]))
        seen = f"line {other_line}" if other is part else f"{other.path}:{other_line}"
        user = user_ids[whole.user[later[first]]]
        item = item_ids[whole.item[later[first]]]
        raise file_error(
            part.path,
            f"user {user!r} and item {item!r} appear again (first on {seen}); "
            'set on-duplicate = "keep-latest" to keep the latest of such rows',
            line=line,
            field="item",
        )
    keep = np.ones(len(key), dtype=bool)
    keep[order[repeated]] = False
    involved = np.concatenate([order[repeated], order[repeated + 1]])
    files = sorted({str(parts[p].path) for p in np.searchsorted(starts, involved, "right") - 1})
    logger.warning(
        '%s: replaced %d duplicate (user, item) rows by the latest (on-duplicate = "keep-latest")',
        ", ".join(files),
        len(repeated),
    )
    bounds = zip(parts, starts[:-1], starts[1:], strict=True)
    return [p.interactions.select(keep[a:b]) for p, a, b in bounds]


def table_interactions(
    table: Table,
    user_ids: tuple[str, ...],
    item_ids: tuple[str, ...],
    rating: np.ndarray,
    timestamp: np.ndarray | None,
    *,
    users_from: str,
    items_from: str,
) -> Located:
    """The interactions of a table with ``user`` and ``item`` columns, re-indexed."""
    return Located(
        table.path,
        Interactions(
            user=table.codes("user", user_ids, users_from),
            item=table.codes("item", item_ids, items_from),
            rating=rating.astype(np.float32),
            timestamp=timestamp,
        ),
        np.asarray(table.line, dtype=np.int64),
    )
