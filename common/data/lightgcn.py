"""The LightGCN / NGCF text format (Gowalla, Yelp2018, Amazon-Book as shipped with LightGCN).

Implicit feedback already split into train and test, with ids already re-indexed
to ``0..n-1`` by the data's publisher; those indices are kept as they are. The
published ``item_list.txt`` is the public catalogue; without it the catalogue is
taken from the interactions (``Catalogue.derived_from_data``), which
:func:`common.data.load_dataset` refuses under DP.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from common.data._parse import (
    ITEM_IDS,
    Located,
    check_on_duplicate,
    drop_duplicates,
    first_non_integer,
    numbered_lines,
    read_table,
    read_text,
)
from common.data.dataset import Catalogue, Dataset, Interactions
from common.errors import InputError, file_error

_UTF_8 = ("utf-8",)
_REMEDY = "LightGCN files are UTF-8 text (the interaction files: ASCII digits and spaces)"


@dataclass(frozen=True)
class _Lines:
    """One interaction file, as arrays.

    Per non-blank line: ``line`` (its number), ``user`` and ``count`` (of items).
    Per item, all lines in order: ``item`` and ``item_line`` (its line number).
    """

    path: Path
    line: np.ndarray
    user: np.ndarray
    count: np.ndarray
    item: np.ndarray
    item_line: np.ndarray


def load_lightgcn(
    root: str | Path, name: str | None = None, on_duplicate: str = "error"
) -> Dataset:
    """Load a dataset in the LightGCN format from the folder ``root``.

    Files (UTF-8; blank lines are passed over):

    * ``train.txt`` and ``test.txt``: one line per user, ``user item item ...``
      separated by spaces (or any whitespace), with 0-based integer ids. A
      line holding only a user id is a user without items in that file;
      several lines of one user add up. They become ``Dataset.canonical_split``;
      ``Dataset.interactions`` is their union.
    * ``user_list.txt`` and ``item_list.txt`` (optional): the header
      ``org_id remap_id``, then one ``original-id index`` line per id with the
      indices 0, 1, ... in order. When present they define the users / items
      (an index outside them is an error) and give the original ids; without
      them there are ``max index + 1`` users / items named by their index
      (for the items: derived from the data, recorded as ``"item ids"`` in
      ``Catalogue.derived_from_data``).

    Every interaction has rating 1.0 (``rating_levels == (1.0,)``) and no
    timestamp; there is no item text and no user feature. A (user, item) pair
    given twice, on one line or in both files, follows ``on_duplicate``:
    ``"error"``, or ``"keep-latest"`` which keeps the later one (``test.txt``
    is later than ``train.txt``). ``name`` defaults to the folder's name.
    """
    root = Path(root)
    check_on_duplicate(on_duplicate)
    files = [_read_lines(root / "train.txt"), _read_lines(root / "test.txt")]
    user_ids = _original_ids(
        root / "user_list.txt", "user", [(f.path, f.user, f.line) for f in files]
    )
    item_list = root / "item_list.txt"
    item_ids = _original_ids(item_list, "item", [(f.path, f.item, f.item_line) for f in files])
    parts = [
        Located(
            f.path,
            Interactions(
                user=np.repeat(f.user, f.count),
                item=f.item,
                rating=np.ones(len(f.item), dtype=np.float32),
            ),
            f.item_line,
        )
        for f in files
    ]
    train, test = drop_duplicates(
        parts, on_duplicate, _index_names(len(user_ids)), _index_names(len(item_ids))
    )
    return Dataset(
        name=name or root.resolve().name,
        catalogue=Catalogue(
            item_ids=item_ids,
            item_text=None,
            rating_levels=(1.0,),
            derived_from_data=() if item_list.is_file() else (ITEM_IDS,),
        ),
        user_ids=user_ids,
        interactions=Interactions.concat([train, test]),
        user_features=np.zeros((len(user_ids), 0), dtype=np.float32),
        canonical_split=(train, test),
    )


def _read_lines(path: Path) -> _Lines:
    line, texts = numbered_lines(read_text(path, _UTF_8, _REMEDY))
    tokens = [text.split() for text in texts]
    count = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    flat = list(chain.from_iterable(tokens))
    starts = np.cumsum(count) - count
    try:
        values = np.array(flat, dtype=np.int64)
    except (ValueError, OverflowError):
        raise _not_an_index(path, line, starts, flat, first_non_integer(flat)) from None
    negative = np.flatnonzero(values < 0)
    if negative.size:
        raise _not_an_index(path, line, starts, flat, int(negative[0]))
    numbers = np.asarray(line, dtype=np.int64)
    return _Lines(
        path,
        numbers,
        user=values[starts],
        count=count - 1,
        item=np.delete(values, starts),
        item_line=np.repeat(numbers, count - 1),
    )


def _not_an_index(
    path: Path, line: list[int], starts: np.ndarray, tokens: list[str], bad: int
) -> InputError:
    """The error for ``tokens[bad]``, on the line whose first token is ``tokens[starts[row]]``."""
    row = int(np.searchsorted(starts, bad, side="right")) - 1
    field = "user" if bad == starts[row] else "item"
    return file_error(
        path,
        f"expected a non-negative integer {field} index, got {tokens[bad]!r}",
        line=line[row],
        field=field,
    )


def _original_ids(
    path: Path, kind: str, uses: list[tuple[Path, np.ndarray, np.ndarray]]
) -> tuple[str, ...]:
    """The original ids of ``kind`` from the list file ``path``, else the indices used.

    ``uses`` gives, per interaction file, its path, the indices it uses and the
    line of each, to locate an index that the list file lacks.
    """
    if not path.is_file():
        return _index_names(max(int(index.max(initial=-1)) for _, index, _ in uses) + 1)
    table = read_table(
        path, None, ("org_id", "remap_id"), encodings=_UTF_8, remedy=_REMEDY, header=True
    )
    remap = table.ints("remap_id", f"an integer {kind} index")
    wrong = np.flatnonzero(remap != np.arange(len(table)))
    if wrong.size:
        row = int(wrong[0])
        raise table.error(row, "remap_id", f"expected {row} (indices in order 0, 1, ...)")
    table.distinct("org_id")
    for used_in, index, line in uses:
        unknown = np.flatnonzero(index >= len(table))
        if unknown.size:
            raise file_error(
                used_in,
                f"{kind} index {index[unknown[0]]} is not in {path} ({len(table)} {kind}s)",
                line=int(line[unknown[0]]),
                field=kind,
            )
    return tuple(table.columns["org_id"])


def _index_names(count: int) -> tuple[str, ...]:
    return tuple(map(str, range(count)))
