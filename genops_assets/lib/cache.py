"""A content-addressed cache of model calls (generations and judge verdicts) in SQLite.

Keys are sha256 digests of everything that determines the answer (model or adapter digest,
prompt, example, decoding parameters, judge model, rubric version), so an unchanged call is
answered from the cache and a changed input misses. SQLite in WAL mode with a busy timeout
makes it safe for several processes and threads writing at once; each write is one
transaction, so a crash never leaves half a row.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from genops_assets.lib.hashing import sha256_json

LOCK_WAIT_S = 60.0


class SqliteStore:
    """A SQLite file in WAL mode shared by threads (one connection each) and processes."""

    def __init__(self, path: str | Path, *schema: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        con = self._con()
        # Switching a fresh file to WAL needs an exclusive lock and SQLite does not wait for it
        # (the busy timeout does not apply), so processes opening a new file at once retry.
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                if con.execute("pragma journal_mode").fetchone()[0].lower() != "wal":
                    con.execute("pragma journal_mode=wal")
                for statement in schema:
                    con.execute(statement)
                con.commit()
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise sqlite3.OperationalError(f"{self.path}: cannot open the cache: {exc}") from exc
                con.rollback()
                time.sleep(0.05)

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=LOCK_WAIT_S)
            con.execute(f"pragma busy_timeout={int(LOCK_WAIT_S * 1000)}")
            self._local.con = con
        return con

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None


def cache_key(**parts: Any) -> str:
    """Digest of the canonical JSON of ``parts`` (order of keyword arguments does not matter)."""
    return sha256_json(parts)


class CallCache(SqliteStore):
    def __init__(self, path: str | Path):
        super().__init__(path, """create table if not exists calls (
                   key text primary key, kind text not null, value text not null, created real not null)""")
        self._stats_lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Any | None:
        row = self._con().execute("select value from calls where key = ?", (key,)).fetchone()
        with self._stats_lock:
            if row is None:
                self.misses += 1
            else:
                self.hits += 1
        return None if row is None else json.loads(row[0])

    def put(self, key: str, kind: str, value: Any) -> None:
        con = self._con()
        with con:
            con.execute(
                "insert or replace into calls (key, kind, value, created) values (?, ?, ?, ?)",
                (key, kind, json.dumps(value, ensure_ascii=False, sort_keys=True), time.time()),
            )

    def count(self, kind: str | None = None) -> int:
        sql, args = "select count(*) from calls", ()
        if kind:
            sql, args = sql + " where kind = ?", (kind,)
        return int(self._con().execute(sql, args).fetchone()[0])

    def stats(self) -> Mapping[str, int]:
        with self._stats_lock:
            return {"hits": self.hits, "misses": self.misses}
