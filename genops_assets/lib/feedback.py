"""The feedback store's request records: read the server's append-only request log
incrementally, redact, and shape rows for a warehouse table (DuckDB locally, BigQuery in
the cloud profile).

The server appends one JSON line per request to ``requests.jsonl`` (crash-safe: a torn last
line is left for the next read). Ingestion remembers the byte offset it reached, so each
line is loaded once; a file shorter than that offset was rotated and is read from the start.

One endpoint serves every task: each record names its ``task`` (null for the base model, and
in records written before the endpoint served several tasks). ``TASK_ROWS`` keeps one task's
rows in a query over the table.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

Redactor = Callable[[dict[str, Any]], dict[str, Any]]

COLUMNS: tuple[tuple[str, str], ...] = (
    ("request_id", "varchar"),
    ("ts", "timestamp"),
    ("event", "varchar"),
    ("model", "varchar"),
    ("adapter_version", "varchar"),
    ("prompt_version", "varchar"),
    ("status", "integer"),
    ("error", "varchar"),
    ("latency_s", "double"),
    ("queue_s", "double"),
    ("prompt_tokens", "integer"),
    ("completion_tokens", "integer"),
    ("finish_reason", "varchar"),
    ("input_text", "varchar"),
    ("response_text", "varchar"),
    ("source_file", "varchar"),
    ("source_offset", "bigint"),
    ("record_json", "varchar"),
    ("task", "varchar"),
)

TASK_ROWS = "(task = ? or task is null)"
"""SQL condition (one parameter: the task's name) that keeps a task's rows of the requests table:
its own, and those that name no task (the base model's, and records older than per-task logging)."""


def no_redaction(record: dict[str, Any]) -> dict[str, Any]:
    return record


def load_redactor(spec: str | None) -> Redactor:
    """``module:function`` taking and returning a record (PII scrubbing); empty: none."""
    if not spec:
        return no_redaction
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"redactor must be 'module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"redactor {spec!r} cannot be loaded: {exc}") from exc
    if not callable(fn):
        raise ValueError(f"redactor {spec!r} is not callable")
    return fn


@dataclass(frozen=True)
class Chunk:
    rows: list[tuple]
    start: int
    end: int
    rotated: bool
    malformed: list[str]


def read_new_records(path: Path, offset: int, redact: Redactor = no_redaction) -> Chunk:
    """Complete lines after ``offset``; a malformed line is reported (file and byte offset) and
    skipped, never silently turned into a default row."""
    if not path.exists():
        return Chunk([], offset, offset, False, [])
    size = path.stat().st_size
    rotated = size < offset
    start = 0 if rotated else offset
    rows, malformed = [], []
    with open(path, "rb") as fh:
        fh.seek(start)
        pos = start
        for raw in _complete_lines(fh):
            line_start, pos = pos, pos + len(raw)
            text = raw.decode("utf-8", errors="replace").strip()
            if not text:
                continue
            try:
                record = json.loads(text)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                malformed.append(f"{path}, byte {line_start}: {exc}")
                continue
            rows.append(to_row(redact(dict(record)), path.name, line_start))
    return Chunk(rows, start, pos, rotated, malformed)


def _complete_lines(fh) -> Iterator[bytes]:
    for raw in fh:
        if not raw.endswith(b"\n"):
            return  # being written: the next read takes it
        yield raw


def _num(v: Any, kind: type) -> Any:
    try:
        return None if v is None else kind(v)
    except (TypeError, ValueError):
        return None


def input_text(record: Mapping[str, Any]) -> str | None:
    """What the user asked: the prompt's one variable (the task input) when the request sent
    ``prompt_variables``, else the last user message."""
    variables = record.get("prompt_variables")
    if isinstance(variables, Mapping) and variables:
        if len(variables) == 1:
            return str(next(iter(variables.values())))
        return json.dumps(variables, ensure_ascii=False, sort_keys=True)
    for message in reversed(record.get("messages") or []):
        if isinstance(message, Mapping) and message.get("role") == "user":
            return None if message.get("content") is None else str(message["content"])
    return None


def to_row(record: Mapping[str, Any], source_file: str, offset: int) -> tuple:
    ts = record.get("ts")
    when = datetime.fromtimestamp(float(ts), tz=UTC).replace(tzinfo=None) if ts is not None else None
    return (
        record.get("request_id") or record.get("id"),
        when,
        record.get("event") or "request",
        record.get("model"),
        None if record.get("version") is None else str(record.get("version")),
        None if record.get("prompt_version") is None else str(record.get("prompt_version")),
        _num(record.get("status"), int),
        record.get("error"),
        _num(record.get("latency_s"), float),
        _num(record.get("queue_s"), float),
        _num(record.get("prompt_tokens"), int),
        _num(record.get("completion_tokens"), int),
        record.get("finish_reason"),
        input_text(record),
        None if record.get("response") is None else str(record["response"]),
        source_file,
        offset,
        json.dumps(record, ensure_ascii=False, sort_keys=True),
        None if record.get("task") is None else str(record["task"]),
    )
