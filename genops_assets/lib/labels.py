"""Labelled and corrected feedback dropped at the boundary:
``<GENOPS_HOME>/feedback/labels/<task>/*.jsonl``.

One JSON object per line::

    {"request_id": "req-...",        optional: the served request this label corrects
     "input": "the message text",    required unless request_id is given
     "output": {...},                the task's output fields, all of them
     "labeler": "alice",             optional
     "note": "free text"}            optional

Every line is checked against the task (its output fields, the task's JSON-schema validator,
the input length); a bad line becomes a :class:`LabelIssue` naming ``file:line`` and
the field, never a silently dropped row. A row's identity is its content (request id, input,
output): the same correction dropped twice, or by two labellers, counts once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genops_assets.lib.hashing import sha256_json
from genops_assets.lib.tasks import TaskSpec

LABEL_SUFFIX = ".jsonl"
KNOWN_KEYS = frozenset({"request_id", "input", "output", "labeler", "note"})


class LabelError(ValueError):
    """One labelled line does not fit the task; the message names the field."""


@dataclass(frozen=True)
class LabelRow:
    """A valid labelled example. ``digest`` is its content identity."""

    source_file: str
    line: int
    request_id: str | None
    input_text: str | None
    output: dict[str, Any]
    labeler: str | None
    note: str | None
    digest: str


@dataclass(frozen=True)
class LabelIssue:
    source_file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.source_file}:{self.line}: {self.message}"


@dataclass(frozen=True)
class LabelScan:
    """Valid rows (deduplicated by content, first occurrence kept) and the lines that failed."""

    rows: tuple[LabelRow, ...]
    issues: tuple[LabelIssue, ...]
    files: tuple[str, ...] = field(default=())

    @property
    def digest(self) -> str:
        """Digest of the set of valid rows; empty string when there are none."""
        return labels_digest(self.rows)


def row_digest(request_id: str | None, input_text: str | None, output: Mapping[str, Any]) -> str:
    return sha256_json({"request_id": request_id, "input": input_text, "output": dict(output)})


def labels_digest(rows: Iterable[LabelRow]) -> str:
    """Order-independent digest of a set of label rows (their content digests, sorted)."""
    digests = sorted({r.digest for r in rows})
    return sha256_json(digests) if digests else ""


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise LabelError(f"'{key}' must be a string, got {value!r}")
    return value


def validate_label(obj: Any, task: TaskSpec) -> tuple[str | None, str | None, dict[str, Any], str | None, str | None]:
    """Check one parsed line; returns (request_id, input, output, labeler, note) or raises ``LabelError``."""
    if not isinstance(obj, dict):
        raise LabelError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - KNOWN_KEYS)
    if unknown:
        raise LabelError(f"unknown key(s) {unknown}; a label line has {sorted(KNOWN_KEYS)}")
    request_id = _opt_str(obj, "request_id")
    if request_id is not None and not request_id.strip():
        raise LabelError("'request_id' is empty")
    text = _opt_str(obj, "input")
    if text is not None and not text.strip():
        text = None
    if text is None and request_id is None:
        raise LabelError("'input' is missing or empty (required unless 'request_id' is given)")
    if text is not None:
        lo, hi = task.input_length
        if not lo <= len(text) <= hi:
            raise LabelError(f"'input' is {len(text)} characters, the task allows {lo}..{hi}")
    output = obj.get("output")
    if not isinstance(output, dict):
        raise LabelError(f"'output' must be an object with the task's fields {list(task.output_fields)}, "
                         f"got {output!r}")
    missing = [f for f in task.output_fields if f not in output]
    if missing:
        raise LabelError(f"'output' misses field(s) {missing}")
    extra = sorted(set(output) - set(task.output_fields))
    if extra:
        raise LabelError(f"'output' has unknown field(s) {extra}; the task's fields are {list(task.output_fields)}")
    issues = task.output_schema.errors(output)
    if issues:
        raise LabelError("; ".join(f"output field '{i.field}': {i.message}" if i.field else f"'output': {i.message}"
                                   for i in issues))
    return request_id, text, {f: output[f] for f in task.output_fields}, _opt_str(obj, "labeler"), _opt_str(obj, "note")


def read_label_file(path: Path, task: TaskSpec) -> tuple[list[LabelRow], list[LabelIssue]]:
    """Valid rows and issues of one JSONL file. An unreadable file is one issue at line 0."""
    name = path.name
    rows: list[LabelRow] = []
    issues: list[LabelIssue] = []
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [], [LabelIssue(name, 0, f"cannot read: {exc}")]
    lines = data.split(b"\n")
    unterminated = bool(lines) and lines[-1] != b""
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            issues.append(LabelIssue(name, line_no, f"not UTF-8 text ({exc.reason} at byte {exc.start})"))
            continue
        except json.JSONDecodeError as exc:
            hint = " - the last line has no newline: drop files whole (write, then rename)" \
                if unterminated and line_no == len(lines) else ""
            issues.append(LabelIssue(name, line_no, f"invalid JSON ({exc.msg} at column {exc.colno}){hint}"))
            continue
        try:
            request_id, text, output, labeler, note = validate_label(obj, task)
        except LabelError as exc:
            issues.append(LabelIssue(name, line_no, str(exc)))
            continue
        rows.append(LabelRow(name, line_no, request_id, text, output, labeler, note,
                             row_digest(request_id, text, output)))
    return rows, issues


def scan_labels(folder: Path, task: TaskSpec) -> LabelScan:
    """Every ``*.jsonl`` file of ``folder`` (sorted by name; hidden files are ignored)."""
    if not folder.is_dir():
        return LabelScan((), (), ())
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix == LABEL_SUFFIX and not p.name.startswith("."))
    rows: list[LabelRow] = []
    issues: list[LabelIssue] = []
    seen: set[str] = set()
    for path in files:
        file_rows, file_issues = read_label_file(path, task)
        issues += file_issues
        for row in file_rows:
            if row.digest not in seen:
                seen.add(row.digest)
                rows.append(row)
    return LabelScan(tuple(rows), tuple(issues), tuple(p.name for p in files))
