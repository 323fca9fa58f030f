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


def cache_key(**parts: Any) -> str:
    """Digest of the canonical JSON of ``parts`` (order of keyword arguments does not matter)."""
    return sha256_json(parts)


class CallCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._stats_lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        con = self._con()
        con.execute("pragma journal_mode=wal")
        con.execute(
            """create table if not exists calls (
                   key text primary key, kind text not null, value text not null, created real not null)"""
        )
        con.commit()

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=60.0, isolation_level="DEFERRED")
            con.execute("pragma busy_timeout=60000")
            self._local.con = con
        return con

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

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None
