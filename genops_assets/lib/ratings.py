"""The rating store: raters, queue items and people's ratings, in one SQLite file
(``<GENOPS_HOME>/feedback/ratings.sqlite``).

Why SQLite and not the DuckDB warehouse: the rating UI is a long-running server, and DuckDB
lets one process write a database file at a time, so a UI holding the warehouse would stall
every pipeline run. SQLite (WAL mode) takes short transactions from several processes; the
``human_ratings`` asset copies the ratings into the warehouse for dbt.

Items are identified by their content (task, kind, input, both answers and their models), so
rebuilding the queue re-finds the same items; an item that leaves the queue is retired, not
deleted, and its ratings stay. A rating names its item's responses by number ("1", "2"), never
by the side of the screen it was shown on; ``shown_first`` records which one was on the left.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from genops_assets.lib.hashing import sha256_json

KINDS = ("pairwise", "single")
SOURCES = ("golden", "live", "gold")
CHOICES = ("1", "2", "tie", "both_bad")

SCHEMA = """
create table if not exists raters (
    name text primary key,
    token_sha256 text not null,
    created_at text not null,
    disabled integer not null default 0
);
create table if not exists items (
    item_id text primary key,
    task text not null,
    kind text not null check (kind in ('pairwise', 'single')),
    source text not null check (source in ('golden', 'live', 'gold')),
    example_id text,
    request_id text,
    input_text text not null,
    prompt_version text,
    response_1 text not null,
    model_1 text not null,
    response_2 text,
    model_2 text,
    reference_json text,
    gold_choice text check (gold_choice is null or gold_choice in ('1', '2', 'tie', 'both_bad')),
    priority real not null default 0,
    reasons text not null default '[]',
    created_at text not null,
    retired integer not null default 0
);
create index if not exists items_task on items (task, retired, priority);
create table if not exists ratings (
    rating_id text primary key,
    task text not null,
    item_id text not null references items (item_id),
    rater text not null references raters (name),
    ts text not null,
    choice text check (choice is null or choice in ('1', '2', 'tie', 'both_bad')),
    shown_first text check (shown_first is null or shown_first in ('1', '2')),
    score_1 integer check (score_1 is null or score_1 between 1 and 5),
    score_2 integer check (score_2 is null or score_2 between 1 and 5),
    unsafe_1 integer not null default 0,
    unsafe_2 integer not null default 0,
    correction_json text,
    model_1 text,
    model_2 text,
    prompt_version text,
    unique (item_id, rater)
);
create index if not exists ratings_task on ratings (task, item_id);
"""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RatingItem:
    """One thing to rate: two answers to compare (``pairwise``) or one to score and correct
    (``single``). ``gold_choice`` marks a gold question, whose right choice is known."""

    task: str
    kind: str
    source: str
    input_text: str
    response_1: str
    model_1: str
    response_2: str | None = None
    model_2: str | None = None
    example_id: str | None = None
    request_id: str | None = None
    prompt_version: str | None = None
    reference_json: str | None = None
    gold_choice: str | None = None
    priority: float = 0.0
    reasons: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"item kind must be one of {KINDS}, got {self.kind!r}")
        if self.source not in SOURCES:
            raise ValueError(f"item source must be one of {SOURCES}, got {self.source!r}")
        if self.kind == "pairwise" and (self.response_2 is None or self.model_2 is None):
            raise ValueError("a pairwise item needs response_2 and model_2")
        if self.gold_choice is not None and self.gold_choice not in CHOICES:
            raise ValueError(f"gold_choice must be one of {CHOICES}, got {self.gold_choice!r}")

    @property
    def item_id(self) -> str:
        return "it_" + sha256_json({"task": self.task, "kind": self.kind, "input": self.input_text,
                                    "response_1": self.response_1, "model_1": self.model_1,
                                    "response_2": self.response_2, "model_2": self.model_2})[:20]

    def row(self) -> dict[str, Any]:
        values = asdict(self)
        values["reasons"] = json.dumps(list(self.reasons))
        return {"item_id": self.item_id, **values}


class RatingStore:
    """The SQLite file of raters, items and ratings; tables are created on first use."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as db:
            db.executescript(SCHEMA)

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in one transaction: committed when the block ends, rolled back on error."""
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            db.execute("pragma journal_mode=wal")
            db.execute("pragma foreign_keys=on")
            with db:
                yield db
        finally:
            db.close()

    def put_items(self, task: str, items: Sequence[RatingItem], retire_others: bool = True) -> dict[str, int]:
        """Add the items not yet stored, update priority and reasons of those that are, and (by
        default) retire the task's open items that are no longer in ``items``; one transaction."""
        wrong = sorted({i.task for i in items} - {task})
        if wrong:
            raise ValueError(f"items of task(s) {wrong} given to the queue of task '{task}'")
        rows = {i.item_id: i.row() for i in items}
        created = now_iso()
        with self.connect() as db:
            stored = {r["item_id"]: r["retired"]
                      for r in db.execute("select item_id, retired from items where task = ?", (task,))}
            known = set(stored)
            new = [r for k, r in rows.items() if k not in known]
            columns = [*next(iter(rows.values())).keys(), "created_at"] if rows else []
            db.executemany(f"insert into items ({', '.join(columns)}) values ({', '.join('?' for _ in columns)})",
                           [[*r.values(), created] for r in new])
            db.executemany("update items set priority = ?, reasons = ?, retired = 0 where item_id = ?",
                           [(r["priority"], r["reasons"], k) for k, r in rows.items() if k in known])
            stale = [(k,) for k in known - set(rows) if not stored[k]] if retire_others else []
            db.executemany("update items set retired = 1 where item_id = ?", stale)
        return {"added": len(new), "kept": len(rows) - len(new), "retired": len(stale)}

    def items(self, task: str, include_retired: bool = True) -> list[dict[str, Any]]:
        sql = "select * from items where task = ?" + ("" if include_retired else " and retired = 0")
        with self.connect() as db:
            return [dict(r) for r in db.execute(sql + " order by priority desc, item_id", (task,))]

    def ratings(self, task: str) -> list[dict[str, Any]]:
        with self.connect() as db:
            return [dict(r) for r in db.execute("select * from ratings where task = ? order by ts, rating_id",
                                                (task,))]
