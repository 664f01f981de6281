"""Find the raw MovieLens files on disk, or fetch them with PyG's download helpers.

PyG's :class:`~torch_geometric.datasets.MovieLens100K` and
:class:`~torch_geometric.datasets.MovieLens1M` know the GroupLens URLs; their own
``download()`` moves the files into ``<root>/raw`` and their constructor then
processes the data (which needs sentence-transformers and the internet). Here
only the download is reused: the zip at the class's ``url`` is fetched with
:func:`torch_geometric.data.download_url` and extracted into ``<root>/raw``,
which yields ``<root>/raw/ml-100k`` or ``<root>/raw/ml-1m``. PyG is imported
only when downloading, so that loading data from disk does not pay for it.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.errors import InputError

# kind -> (folder inside the GroupLens zip, files the loader needs)
RAW_FILES = {
    "ml-100k": ("ml-100k", ("u.data", "u.item", "u.user")),
    "ml-1m": ("ml-1m", ("ratings.dat", "movies.dat", "users.dat")),
}


def ensure_raw_files(kind: str, root: str | Path, download: bool) -> Path:
    """The folder holding the raw files of ``kind`` (``"ml-100k"`` or ``"ml-1m"``).

    Looks in ``root``, then in ``root/raw/<folder>`` (where this function
    extracts them) and ``root/raw`` (where PyG's own dataset class puts them).
    If none holds every file the loader needs, downloads them into
    ``root/raw/<folder>`` when ``download`` is true, else raises an
    :class:`InputError` naming the folder and the files expected.
    """
    if kind not in RAW_FILES:
        raise InputError(f"dataset kind: expected one of {tuple(RAW_FILES)}, got {kind!r}")
    folder, names = RAW_FILES[kind]
    root = Path(root).expanduser()
    raw = root / "raw"
    for candidate in (root, raw / folder, raw):
        if all((candidate / name).is_file() for name in names):
            return candidate
    if not download:
        raise InputError(
            f"{root}: expected the {kind} files {', '.join(names)} there or in "
            f"{raw / folder}; set download = true to fetch them from GroupLens"
        )
    url = _download(kind, raw)
    missing = [name for name in names if not (raw / folder / name).is_file()]
    if missing:
        raise InputError(f"{url}: the download lacks {', '.join(missing)} in {raw / folder}")
    return raw / folder


def _download(kind: str, raw: Path) -> str:
    """Fetch and extract the zip of ``kind`` into ``raw``; returns its URL."""
    from torch_geometric.data import download_url, extract_zip
    from torch_geometric.datasets import MovieLens1M, MovieLens100K

    url = {"ml-100k": MovieLens100K.url, "ml-1m": MovieLens1M.url}[kind]
    archive = download_url(url, str(raw))
    extract_zip(archive, str(raw))
    os.remove(archive)
    return url
