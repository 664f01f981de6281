"""The one exception type for problems a user can fix."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input: a data file, a configuration key or a command-line value.

    The message always names where the problem is (file and line, field, or key)
    and what was expected, so that an operator can fix it without reading code.
    """


def file_error(
    path: str | Path,
    problem: str,
    *,
    line: int | None = None,
    field: str | None = None,
) -> InputError:
    """Build an :class:`InputError` located at ``path[:line]`` and ``field``.

    Example: ``file_error("u.data", "expected an integer rating 1-5, got 'x'",
    line=17, field="rating")`` reads ``u.data:17: field 'rating': expected ...``.
    """
    where = f"{path}:{line}" if line is not None else str(path)
    what = f"field '{field}': {problem}" if field is not None else problem
    return InputError(f"{where}: {what}")
