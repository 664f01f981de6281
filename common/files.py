"""Writing files so that a crash leaves either the old or the new content, never half."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PRIVATE = 0o600
"""File mode of a site's private state (ledger, private embeddings), as for keys."""


@contextmanager
def replacing(path: Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds, rename it over ``path``.

    With ``mode`` the temporary file is created with that mode before anything is
    written to it, so the content is never readable by others, not even briefly.
    """
    tmp = path.with_name(path.name + ".tmp")
    if mode is not None:
        tmp.unlink(missing_ok=True)
        os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_EXCL, mode))
    yield tmp
    os.replace(tmp, path)


def write_json(path: Path, value: Any, mode: int | None = None) -> None:
    """Write ``value`` as indented JSON, atomically (with file ``mode``, if given)."""
    with replacing(path, mode) as tmp:
        tmp.write_text(json.dumps(value, indent=2))
