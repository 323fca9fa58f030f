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

Raters sign in with a name and a token made by ``add_rater``: the token is shown once and only
its sha256 is stored. A submission is one transaction, and ``unique (item_id, rater)`` makes a
second rating of the same item by the same rater fail however the two requests interleave.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genops_assets.lib.hashing import sha256_json

if TYPE_CHECKING:
    from genops_assets.lib.output_schema import OutputSchema
    from genops_assets.lib.tasks import Feedback

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


STORE_FILE = Path("feedback", "ratings.sqlite")
RATER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


def store_path(home: str | Path) -> Path:
    """Where the rating store lives in a genops data directory."""
    return Path(home) / STORE_FILE


class RatingError(Exception):
    """A request the store refuses; ``status`` is the HTTP status the rating API answers with."""

    status = 400


class AuthError(RatingError):
    """Unknown rater, wrong token or disabled rater (the message does not say which)."""

    status = 401


class UnknownItem(RatingError):
    """No such item in the task's queue."""

    status = 404


class DuplicateRating(RatingError):
    """The rater has rated this item already; the first rating stands."""

    status = 409


class RetiredItem(RatingError):
    """The item has left the queue (the queue was rebuilt without it); its ratings stay."""

    status = 410


class InvalidRating(RatingError):
    """A choice or score that does not fit the item (a missing choice, a score out of 1-5)."""

    status = 422

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidCorrection(InvalidRating):
    """A corrected answer that is not JSON or breaks the task's output schema; ``field`` names
    the first field at fault ("" for the object as a whole)."""


class RaterExists(ValueError):
    """``add_rater`` for a name that is taken (pass ``rotate=True`` to issue a new token)."""


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def shown_first(rater: str, item_id: str) -> str:
    """Which response ("1" or "2") goes on the left for this rater and item: random across raters
    and items, but the same on every reload, so a rater never sees the sides swap."""
    return "1" if hashlib.sha256(f"{rater}\0{item_id}".encode()).digest()[0] % 2 == 0 else "2"


@dataclass(frozen=True)
class Progress:
    """A rater's place in a task's queue: items rated, and items still open to them."""

    done: int
    remaining: int

    @property
    def total(self) -> int:
        return self.done + self.remaining


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

    def item(self, item_id: str) -> dict[str, Any] | None:
        with self.connect() as db:
            row = db.execute("select * from items where item_id = ?", (item_id,)).fetchone()
        return dict(row) if row else None

    # raters

    def add_rater(self, name: str, rotate: bool = False) -> str:
        """Create rater ``name`` and return its token; only the token's sha256 is stored, so this
        is the one time it can be shown. ``rotate=True`` replaces an existing rater's token."""
        if not RATER_NAME.fullmatch(name or ""):
            raise ValueError(f"rater name {name!r}: use 1-64 letters, digits, '_', '.', '@' or '-', "
                             "starting with a letter or digit")
        token = secrets.token_urlsafe(24)
        with self.connect() as db:
            exists = db.execute("select 1 from raters where name = ?", (name,)).fetchone()
            if exists and not rotate:
                raise RaterExists(f"rater '{name}' exists (`genops raters add --rotate {name}` issues a new token)")
            if not exists and rotate:
                raise ValueError(f"rater '{name}' does not exist: nothing to rotate")
            db.execute("insert into raters (name, token_sha256, created_at) values (?, ?, ?) "
                       "on conflict (name) do update set token_sha256 = excluded.token_sha256",
                       (name, token_digest(token), now_iso()))
        return token

    def disable_rater(self, name: str) -> None:
        """Refuse the rater's token from now on; their ratings stay."""
        with self.connect() as db:
            if db.execute("update raters set disabled = 1 where name = ?", (name,)).rowcount == 0:
                raise ValueError(f"rater '{name}' does not exist")

    def list_raters(self) -> list[dict[str, Any]]:
        """Every rater with the number of ratings they gave (tokens are never listed)."""
        with self.connect() as db:
            return [dict(r) for r in db.execute(
                "select r.name, r.created_at, r.disabled, count(g.rating_id) as ratings from raters r "
                "left join ratings g on g.rater = r.name group by r.name order by r.name")]

    def authenticate(self, name: str, token: str) -> None:
        """Raise AuthError unless ``token`` is the enabled rater ``name``'s token. The digests are
        compared in constant time, and an unknown name costs the same comparison."""
        with self.connect() as db:
            row = db.execute("select token_sha256, disabled from raters where name = ?", (name or "",)).fetchone()
        stored = row["token_sha256"] if row else token_digest(secrets.token_urlsafe(24))
        matches = hmac.compare_digest(stored, token_digest(token or ""))
        if row is None or not matches or row["disabled"]:
            raise AuthError("unknown rater or wrong token")

    # the queue

    def _open_items(self, db: sqlite3.Connection, task: str, rater: str, feedback: Feedback) -> list[sqlite3.Row]:
        """Open items the rater has not rated, highest priority first: gold questions (asked of
        every rater) and the others while they have fewer than ``ratings_per_item`` ratings."""
        return db.execute(
            "select i.*, (select count(*) from ratings g where g.item_id = i.item_id) as n_ratings from items i "
            "where i.task = ? and i.retired = 0 "
            "and not exists (select 1 from ratings g where g.item_id = i.item_id and g.rater = ?) "
            "and (i.source = 'gold' or (select count(*) from ratings g where g.item_id = i.item_id) < ?) "
            "order by i.priority desc, i.created_at, i.item_id",
            (task, rater, feedback.ratings_per_item)).fetchall()

    def next_item(self, task: str, rater: str, feedback: Feedback | None = None) -> dict[str, Any] | None:
        """The next item for ``rater`` in ``task``'s queue, or None when nothing is left. Gold
        questions come in at about ``feedback.gold_share`` of the rater's ratings (all of them once
        the other items are done), so a careless rater meets them without being able to tell."""
        from genops_assets.lib.tasks import Feedback

        feedback = feedback or Feedback()
        with self.connect() as db:
            candidates = self._open_items(db, task, rater, feedback)
            done = db.execute("select count(*) as n, coalesce(sum(i.source = 'gold'), 0) as gold from ratings g "
                              "join items i on i.item_id = g.item_id where g.task = ? and g.rater = ?",
                              (task, rater)).fetchone()
        gold = [r for r in candidates if r["source"] == "gold"]
        other = [r for r in candidates if r["source"] != "gold"]
        gold_due = math.floor(feedback.gold_share * (done["n"] + 1)) > done["gold"]
        pick = gold[0] if gold and (gold_due or not other) else (other[0] if other else None)
        if pick is None:
            return None
        row = dict(pick)
        row.pop("n_ratings")
        return row

    def progress(self, task: str, rater: str, feedback: Feedback | None = None) -> Progress:
        from genops_assets.lib.tasks import Feedback

        with self.connect() as db:
            done = db.execute("select count(*) from ratings where task = ? and rater = ?", (task, rater)).fetchone()[0]
            remaining = len(self._open_items(db, task, rater, feedback or Feedback()))
        return Progress(done=done, remaining=remaining)

    def submit(self, task: str, item_id: str, rater: str, *, choice: str | None = None,
               shown_first: str | None = None, score_1: int | None = None, score_2: int | None = None,
               unsafe_1: bool = False, unsafe_2: bool = False, correction: Mapping[str, Any] | str | None = None,
               output_schema: OutputSchema | None = None) -> dict[str, Any]:
        """Store one rating in one transaction and return its row. ``choice`` and ``shown_first``
        name responses by number; the item's model versions and prompt version are copied onto the
        rating. A correction (an object, or its JSON text) must pass ``output_schema``."""
        correction_json = _correction_json(correction, output_schema)
        row = {"rating_id": "rt_" + sha256_json({"item": item_id, "rater": rater})[:20], "task": task,
               "item_id": item_id, "rater": rater, "ts": now_iso(), "choice": choice, "shown_first": shown_first,
               "score_1": score_1, "score_2": score_2, "unsafe_1": int(bool(unsafe_1)),
               "unsafe_2": int(bool(unsafe_2)), "correction_json": correction_json}
        with self.connect() as db:
            r = db.execute("select disabled from raters where name = ?", (rater,)).fetchone()
            if r is None or r["disabled"]:
                raise AuthError("unknown rater or wrong token")
            item = db.execute("select * from items where item_id = ?", (item_id,)).fetchone()
            if item is None or item["task"] != task:
                raise UnknownItem(f"item '{item_id}' does not exist in the queue of task '{task}'")
            if item["retired"]:
                raise RetiredItem(f"item '{item_id}' has left the queue of task '{task}'; take the next one")
            _check_rating(item, row)
            row.update(model_1=item["model_1"], model_2=item["model_2"], prompt_version=item["prompt_version"])
            try:
                db.execute(f"insert into ratings ({', '.join(row)}) values ({', '.join('?' for _ in row)})",
                           list(row.values()))
            except sqlite3.IntegrityError as exc:
                if "unique" not in str(exc).lower():
                    raise
                raise DuplicateRating(f"rater '{rater}' has already rated item '{item_id}'; "
                                      "a rating is given once and is not replaced") from exc
        return row


def _check_rating(item: sqlite3.Row, row: dict[str, Any]) -> None:
    """The choice and scores a rating of ``item`` may carry (pairwise: a choice; single: a score)."""
    pairwise = item["kind"] == "pairwise"
    if pairwise and row["choice"] not in CHOICES:
        raise InvalidRating(f"choice must be one of {list(CHOICES)} (responses by number), got {row['choice']!r}",
                            "choice")
    if not pairwise and row["choice"] is not None:
        raise InvalidRating("a single answer takes a score and a correction, not a choice", "choice")
    if row["shown_first"] not in (None, "1", "2") or (not pairwise and row["shown_first"] not in (None, "1")):
        raise InvalidRating(f"shown_first must be '1' or '2', got {row['shown_first']!r}", "shown_first")
    if not pairwise and row["score_1"] is None:
        raise InvalidRating("a single answer needs a score (1-5)", "score_1")
    if not pairwise and (row["score_2"] is not None or row["unsafe_2"]):
        raise InvalidRating("a single answer has no second response to score", "score_2")
    for key in ("score_1", "score_2"):
        value = row[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5):
            raise InvalidRating(f"{key} must be a whole number from 1 to 5, got {value!r}", key)


def _correction_json(correction: Mapping[str, Any] | str | None, schema: OutputSchema | None) -> str | None:
    """The corrected answer as stored (compact JSON): the task's output schema passed it, then
    every PII span in its text was replaced by ``<ENTITY>`` (what people type is redacted before
    it is stored). A correction that is only valid with its PII in it is refused, naming the field."""
    if correction is None or (isinstance(correction, str) and not correction.strip()):
        return None
    if schema is None:
        raise ValueError("a correction needs the task's output schema to be checked against")
    if isinstance(correction, str):
        try:
            correction = json.loads(correction)
        except json.JSONDecodeError as exc:
            raise InvalidCorrection(f"the corrected answer is not valid JSON: {exc}", "") from exc
    issues = schema.errors(correction)
    if issues:
        first = issues[0]
        where = f"field '{first.field}'" if first.field else "the answer object"
        raise InvalidCorrection(f"corrected answer, {where}: {first.message}", first.field)
    redacted, found = _redact_strings(correction, "")
    if found:
        broken = schema.errors(redacted)
        if broken:
            first = broken[0]
            field = first.field if first.field in found else next(iter(found))
            raise InvalidCorrection(
                f"corrected answer, field '{field}' holds personal data ({', '.join(sorted(set(found[field])))}) "
                f"and is not valid once that is redacted ({first.message}); write the answer without it", field)
    return json.dumps(redacted, ensure_ascii=False, separators=(",", ":"))


def _redact_strings(value: Any, path: str) -> tuple[Any, dict[str, list[str]]]:
    """``value`` with PII redacted in every string it holds, and the entity types found per field path."""
    from genops_assets.lib.guardrails.pii import redact_pii

    if isinstance(value, str):
        text, findings = redact_pii(value)
        return text, ({path: [f.entity for f in findings]} if findings else {})
    found: dict[str, list[str]] = {}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            out[k], sub = _redact_strings(v, f"{path}.{k}" if path else str(k))
            found.update(sub)
        return out, found
    if isinstance(value, list):
        items = []
        for i, v in enumerate(value):
            item, sub = _redact_strings(v, f"{path}[{i}]")
            items.append(item)
            found.update(sub)
        return items, found
    return value, found
