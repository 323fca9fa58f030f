"""JSON Lines: the one reader every genops file format goes through.

A bad line is named by file and line number; blank lines are skipped (editors leave them).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class JsonlError(ValueError):
    """A JSON Lines file that cannot be read; the message names the file and the line."""


def iter_jsonl(path: str | Path, *, error: type[Exception] = JsonlError) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for every non-blank line of ``path``, 1-based.

    Invalid JSON or bytes that are not UTF-8 raise ``error`` (a ``ValueError`` subclass by
    default; callers with their own error type pass it) naming the file and line."""
    p = Path(path)
    with open(p, "rb") as fh:  # decoded line by line, so a bad byte is named by its line
        for line_no, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise error(f"{p}, line {line_no}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{p}, line {line_no}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
            yield line_no, value


def read_jsonl(path: str | Path, *, error: type[Exception] = JsonlError) -> list[Any]:
    """Every value of a JSON Lines file, in order (see :func:`iter_jsonl`)."""
    return [value for _, value in iter_jsonl(path, error=error)]
