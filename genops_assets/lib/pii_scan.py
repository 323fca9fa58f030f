"""PII scans of tables, frames and a whole genops data directory.

Everything genops stores is looked at with the same Presidio pattern recognizers the guardrails
use (``lib.guardrails.pii``): text files line by line, every text value of every SQLite table,
every VARCHAR column of every DuckDB table, and any other file (pickled Dagster outputs, MLflow
artifacts, SQLite journals) through the printable text runs it contains. A finding names where
the PII is (file, table, column, row) and its entity type, never the value itself, so findings
can be logged, shown as metadata and asserted on.

Files of numbers only (model weights, trainer checkpoints, images, numpy arrays) are listed as
skipped, with their kind.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genops_assets.lib.guardrails.pii import DEFAULT_ENTITIES, DEFAULT_MIN_SCORE, find_pii

TEXT_SUFFIXES = frozenset({".jsonl", ".json", ".md", ".yaml", ".yml", ".csv", ".tsv", ".log", ".txt", ".html",
                           ".out", ".err", ".j2", ".ndjson"})
WEIGHT_SUFFIXES = frozenset({".safetensors", ".gguf"})
# Trainer checkpoints (optimizer and scheduler state, RNG state): tensors written by torch.save.
TRAINING_STATE_SUFFIXES = frozenset({".pt", ".pth", ".ckpt"})
SQLITE_MAGIC = b"SQLite format 3\x00"
DUCKDB_MAGIC = b"DUCK"  # at byte 8 of a DuckDB database file
# Files that hold numbers only, listed as skipped with their kind.
SKIPPED_KINDS = ("model weights", "training state", "image", "numeric array")
# Printable ASCII runs in a binary file long enough to hold an e-mail address or a phone number
# (every entity looked for is written in ASCII).
_TEXT_RUN = re.compile(rb"[\x09\x0a\x0d\x20-\x7e]{6,}")
# Binary formats that hold pixels or numbers, never text: listed as skipped.
_NON_TEXT_MAGIC = {b"\x89PNG\r\n\x1a\n": "image", b"\xff\xd8\xff": "image", b"GIF8": "image",
                   b"\x93NUMPY": "numeric array"}
_DUCKDB_TEXT_TYPES = ("VARCHAR", "JSON")


@dataclass(frozen=True)
class ScanFinding:
    """One PII span: where it is and what it is (never the value)."""

    location: str              # file path (relative to the scanned root) or table name
    entity: str
    table: str | None = None
    column: str | None = None
    row: Any = None            # row id, line number or byte offset of the text run

    def describe(self) -> str:
        where = self.location
        if self.table:
            where += f" table {self.table}"
        if self.column:
            where += f" column {self.column}"
        if self.row is not None:
            where += f" row {self.row}"
        return f"{self.entity} in {where}"

    def as_dict(self) -> dict[str, Any]:
        return {"location": self.location, "table": self.table, "column": self.column,
                "row": None if self.row is None else str(self.row), "entity": self.entity}


@dataclass
class ScanReport:
    findings: list[ScanFinding] = field(default_factory=list)
    files: int = 0
    tables: int = 0
    values: int = 0
    skipped: list[str] = field(default_factory=list)   # "path (why)"

    @property
    def clean(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        head = (f"{len(self.findings)} PII finding(s) in {self.files} file(s), {self.tables} table(s), "
                f"{self.values} text value(s)")
        return head if self.clean else head + ": " + "; ".join(f.describe() for f in self.findings[:20])


# Machine-written numbers that the card and phone recognizers misread: decimal numbers
# (latencies, epoch timestamps "1796230571.759", "0.4123456789012345" holds a Luhn-valid
# 16-digit run one time in ten; two of them side by side read as a phone number), hex digests,
# UUIDs and prefixed ids ("ex_4997605063013883"). Masked with spaces (positions kept) before the
# recognizers run; a card, phone, SSN or IBAN is never written this way (a phone number written
# with dots has two or more: "212.555.0142" is left alone).
_MACHINE_NUMBERS = re.compile(
    r"(?<![\d.])\d+\.\d+(?:[eE][-+]?\d+)?(?![\d.])"
    r"|\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"
    r"|\b[0-9a-fA-F]{32,}\b"
    r"|\b[A-Za-z][A-Za-z0-9]*_[0-9a-fA-F]{8,}\b")
# Every default entity needs a digit (phone, card, SSN, IBAN, IP) or an "@" (e-mail).
_DEFAULT_NEEDS = re.compile(r"[0-9@]")


def _not_personal(entity: str, value: str) -> bool:
    """Loopback, private and unspecified IP addresses (the endpoint's own URLs) name no one."""
    if entity != "IP_ADDRESS":
        return False
    try:
        return not ipaddress.ip_address(value.strip("[]")).is_global
    except ValueError:
        return False


@functools.lru_cache(maxsize=65536)
def _scan_text_cached(text: str, entities: tuple[str, ...], min_score: float) -> tuple[str, ...]:
    if set(entities) <= set(DEFAULT_ENTITIES) and not _DEFAULT_NEEDS.search(text):
        return ()
    masked = _MACHINE_NUMBERS.sub(lambda m: " " * len(m.group()), text)
    return tuple(f.entity for f in find_pii(masked, entities, min_score)
                 if not _not_personal(f.entity, text[f.start:f.end]))


def _scan_text(text: str, entities: Sequence[str], min_score: float) -> list[str]:
    return list(_scan_text_cached(text, tuple(entities), min_score)) if text else []


def scan_values(values: Iterable[tuple[Any, str | None]], *, location: str, table: str | None = None,
                column: str | None = None, entities: Sequence[str] = DEFAULT_ENTITIES,
                min_score: float = DEFAULT_MIN_SCORE, report: ScanReport | None = None) -> list[ScanFinding]:
    """Findings in ``(row id, text)`` pairs; non-text values are left alone."""
    found: list[ScanFinding] = []
    for row, text in values:
        if not isinstance(text, str):
            continue
        if report is not None:
            report.values += 1
        found += [ScanFinding(location, e, table, column, row) for e in _scan_text(text, entities, min_score)]
    if report is not None:
        report.findings += found
    return found


def text_columns(df) -> list[str]:
    """Columns of a pandas frame holding strings (object or string dtype with a str value)."""
    out = []
    for c in df.columns:
        s = df[c]
        if str(s.dtype) in ("object", "string") and any(isinstance(v, str) for v in s.tolist()):
            out.append(str(c))
    return out


def scan_frame(df, *, table: str, id_column: str | None = None, columns: Sequence[str] | None = None,
               entities: Sequence[str] = DEFAULT_ENTITIES, min_score: float = DEFAULT_MIN_SCORE,
               report: ScanReport | None = None) -> list[ScanFinding]:
    """Findings in the text columns of a pandas frame (``columns``: only those), rows named by
    ``id_column`` (else the frame's index)."""
    if id_column is not None and id_column not in df.columns:
        raise KeyError(f"{table}: id column '{id_column}' not in {list(df.columns)}")
    ids = df[id_column].tolist() if id_column else df.index.tolist()
    found: list[ScanFinding] = []
    for col in (list(columns) if columns is not None else text_columns(df)):
        if col not in df.columns:
            raise KeyError(f"{table}: column '{col}' not in {list(df.columns)}")
        found += scan_values(zip(ids, df[col].tolist(), strict=True), location=table, table=table, column=col,
                             entities=entities, min_score=min_score, report=report)
    if report is not None:
        report.tables += 1
    return found


def scan_duckdb_table(con, table: str, *, id_column: str | None = None, location: str | None = None,
                      entities: Sequence[str] = DEFAULT_ENTITIES, min_score: float = DEFAULT_MIN_SCORE,
                      report: ScanReport | None = None) -> list[ScanFinding]:
    """Findings in the VARCHAR/JSON columns of one DuckDB table (``schema.table``, unquoted) on ``con``."""
    schema, _, name = table.rpartition(".")
    cols = con.execute(
        "select column_name, data_type from information_schema.columns where table_name = ? "
        + ("and table_schema = ? " if schema else "") + "order by ordinal_position",
        [name, schema] if schema else [name]).fetchall()
    if not cols:
        raise KeyError(f"DuckDB table {table} not found")
    texts = [c for c, t in cols if str(t).upper().startswith(_DUCKDB_TEXT_TYPES)]
    if not texts:
        if report is not None:
            report.tables += 1
        return []
    idc = id_column if id_column in {c for c, _ in cols} else None
    select = ", ".join(f'"{c}"' for c in texts)
    quoted = ".".join(f'"{part}"' for part in ((schema, name) if schema else (name,)))
    rows = con.execute(f'select {f"{chr(34)}{idc}{chr(34)}, " if idc else ""}{select} from {quoted}').fetchall()
    found: list[ScanFinding] = []
    offset = 1 if idc else 0
    for i, c in enumerate(texts):
        found += scan_values(((r[0] if idc else n, r[i + offset]) for n, r in enumerate(rows)),
                             location=location or table, table=table, column=c, entities=entities,
                             min_score=min_score, report=report)
    if report is not None:
        report.tables += 1
    return found


def scan_duckdb_file(path: Path, *, location: str | None = None, entities: Sequence[str] = DEFAULT_ENTITIES,
                     min_score: float = DEFAULT_MIN_SCORE, report: ScanReport | None = None) -> list[ScanFinding]:
    """Findings in every base table of a DuckDB database file (opened read-only)."""
    import duckdb

    found: list[ScanFinding] = []
    con = duckdb.connect(str(path), read_only=True)
    try:
        tables = con.execute("select table_schema, table_name from information_schema.tables "
                             "where table_type = 'BASE TABLE' order by 1, 2").fetchall()
        for schema, name in tables:
            found += scan_duckdb_table(con, f"{schema}.{name}", location=location or str(path),
                                       entities=entities, min_score=min_score, report=report)
    finally:
        con.close()
    return found


def scan_sqlite_file(path: Path, *, location: str | None = None, entities: Sequence[str] = DEFAULT_ENTITIES,
                     min_score: float = DEFAULT_MIN_SCORE, report: ScanReport | None = None) -> list[ScanFinding]:
    """Findings in every text value of every table of a SQLite database (read-only; SQLite types
    are per value, so every column is looked at and only strings are scanned)."""
    found: list[ScanFinding] = []
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("select name from sqlite_master where type = 'table'")]
        for t in tables:
            cur = con.execute(f'select * from "{t}"')
            cols = [d[0] for d in cur.description]
            rows = cur.fetchall()
            for i, c in enumerate(cols):
                found += scan_values(((n, r[i]) for n, r in enumerate(rows)), location=location or str(path),
                                     table=t, column=c, entities=entities, min_score=min_score, report=report)
            if report is not None:
                report.tables += 1
    finally:
        con.close()
    return found


def _text_lines(data: bytes) -> Iterator[tuple[int, str]]:
    yield from enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1)


def _binary_runs(data: bytes) -> Iterator[tuple[int, str]]:
    for m in _TEXT_RUN.finditer(data):
        yield m.start(), m.group().decode("utf-8", errors="replace")


def _kind(path: Path, head: bytes) -> str:
    if head.startswith(SQLITE_MAGIC):
        return "sqlite"
    if head[8:12] == DUCKDB_MAGIC:
        return "duckdb"
    if path.suffix.lower() in WEIGHT_SUFFIXES:
        return "model weights"
    if path.suffix.lower() in TRAINING_STATE_SUFFIXES:
        return "training state"
    for magic, kind in _NON_TEXT_MAGIC.items():
        if head.startswith(magic):
            return kind
    if path.suffix.lower() in TEXT_SUFFIXES and b"\x00" not in head:
        return "text"
    return "binary"


def scan_file(path: Path, *, root: Path | None = None, entities: Sequence[str] = DEFAULT_ENTITIES,
              min_score: float = DEFAULT_MIN_SCORE, report: ScanReport | None = None) -> list[ScanFinding]:
    """Findings in one file of any kind (text, SQLite, DuckDB, other binary)."""
    report = report if report is not None else ScanReport()
    rel = str(path.relative_to(root)) if root else str(path)
    with open(path, "rb") as fh:
        head = fh.read(4096)
    kind = _kind(path, head)
    if kind in SKIPPED_KINDS:
        report.skipped.append(f"{rel} ({kind})")
        return []
    report.files += 1
    if kind == "sqlite":
        # Its -wal and -journal files have no SQLite header: they are scanned as binary files.
        return scan_sqlite_file(path, location=rel, entities=entities, min_score=min_score, report=report)
    if kind == "duckdb":
        return scan_duckdb_file(path, location=rel, entities=entities, min_score=min_score, report=report)
    data = path.read_bytes()
    lines = _text_lines(data) if kind == "text" else _binary_runs(data)
    return scan_values(lines, location=rel, entities=entities, min_score=min_score, report=report)


def scan_home(root: Path, *, entities: Sequence[str] = DEFAULT_ENTITIES, min_score: float = DEFAULT_MIN_SCORE,
              exclude: Sequence[str] = ()) -> ScanReport:
    """Every file under a genops data directory: the warehouse, the request logs and feedback
    store, the rating store, MLflow's tracking database and artifact store, Dagster's storage and
    compute logs. ``exclude``: relative folder prefixes left out (listed as skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"genops home {root} is not a folder")
    report = ScanReport()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(root).as_posix()
        if any(rel == e or rel.startswith(e.rstrip("/") + "/") for e in exclude):
            report.skipped.append(f"{rel} (excluded)")
            continue
        scan_file(path, root=root, entities=entities, min_score=min_score, report=report)
    return report


PII_COLUMN = "pii_entities"


def validate_no_pii(name: str, df, *, id_column: str, columns: Sequence[str],
                    entities: Sequence[str] = DEFAULT_ENTITIES, min_score: float = DEFAULT_MIN_SCORE):
    """A Great Expectations validation that no row of ``df`` holds PII in ``columns`` (those
    present): Presidio's findings become a ``pii_entities`` column (``column:ENTITY, ...``, null
    on a clean row) that must be null, as the output-schema errors are for the mart suites.
    Returns the report (failing rows by ``id_column``) and the findings."""
    import great_expectations.expectations as gxe

    from genops_assets.lib.validation import run_suite

    present = [c for c in columns if c in df.columns]
    findings = scan_frame(df, table=name, id_column=id_column, columns=present, entities=entities,
                          min_score=min_score)
    by_row: dict[str, list[str]] = {}
    for f in findings:
        by_row.setdefault(str(f.row), []).append(f"{f.column}:{f.entity}")
    frame = df[[id_column, *present]].copy()
    frame[PII_COLUMN] = [", ".join(sorted(set(by_row[str(i)]))) if str(i) in by_row else None
                         for i in frame[id_column].tolist()]
    report = run_suite(f"{name}_pii", frame, [gxe.ExpectColumnValuesToBeNull(column=PII_COLUMN)], id_column)
    return report, findings
