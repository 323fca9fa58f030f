"""The audit log: who moved which model version where, when and why.

One SQLite table, append-only: triggers refuse every UPDATE and DELETE, so an entry once written
stays as written (tampering needs the file itself, not SQL). Deploys, promotions and rollbacks
are recorded by the code that does them (the ``deployed_endpoint`` asset, ``genops rollback``,
the quality-regression sensor); the actor is the Dagster run id, the sensor's name or the OS
user of the command line.
"""

from __future__ import annotations

import getpass
import json
import sqlite3
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ACTIONS = ("deploy", "promote", "rollback")

_SCHEMA = """
create table if not exists audit_log (
    id integer primary key autoincrement,
    at text not null,
    action text not null check (action in ('deploy', 'promote', 'rollback')),
    model text not null,
    version text,
    previous text,
    actor text not null,
    reason text not null,
    run_id text,
    details text
);
create trigger if not exists audit_log_no_update before update on audit_log
begin select raise(abort, 'audit_log is append-only: UPDATE refused'); end;
create trigger if not exists audit_log_no_delete before delete on audit_log
begin select raise(abort, 'audit_log is append-only: DELETE refused'); end;
create index if not exists audit_log_model on audit_log (model, id);
"""


def cli_actor() -> str:
    """The actor of a command-line action: the OS user."""
    try:
        return f"user:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (containers)
        return "user:unknown"


class AuditLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=30)
        con.row_factory = sqlite3.Row
        con.executescript(_SCHEMA)
        return con

    def record(self, action: str, model: str, version: str | None, previous: str | None = None, *,
               actor: str, reason: str, run_id: str | None = None,
               details: Mapping[str, Any] | None = None) -> int:
        """Append one entry; returns its id."""
        if action not in ACTIONS:
            raise ValueError(f"audit action '{action}' is not one of {ACTIONS}")
        if not model or not actor or not reason:
            raise ValueError(f"audit entry needs a model, an actor and a reason (got model={model!r}, "
                             f"actor={actor!r}, reason={reason!r})")
        con = self._connect()
        try:
            with con:
                cur = con.execute(
                    "insert into audit_log (at, action, model, version, previous, actor, reason, run_id, details) "
                    "values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (datetime.now(UTC).isoformat(timespec="seconds"), action, model,
                     None if version is None else str(version), None if previous is None else str(previous),
                     actor, reason, run_id,
                     None if details is None else json.dumps(dict(details), sort_keys=True, default=str)))
            return int(cur.lastrowid)
        finally:
            con.close()

    def entries(self, model: str | None = None, limit: int = 50) -> list[dict]:
        """The newest ``limit`` entries (of ``model``), newest first."""
        if not self.path.exists():
            return []
        con = self._connect()
        try:
            sql = "select * from audit_log" + (" where model = ?" if model else "") + " order by id desc limit ?"
            rows = con.execute(sql, ((model,) if model else ()) + (int(limit),)).fetchall()
        finally:
            con.close()
        out = []
        for r in rows:
            d = dict(r)
            d["details"] = json.loads(d["details"]) if d["details"] else None
            out.append(d)
        return out


def markdown_table(entries: list[dict]) -> str:
    """Entries as a Markdown table (asset metadata, ``genops audit``)."""
    if not entries:
        return "_no audit entries_"
    lines = ["| id | at | action | model | version | previous | actor | reason |", "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        cells = [e["id"], e["at"], e["action"], e["model"], e["version"] or "", e["previous"] or "", e["actor"],
                 str(e["reason"]).replace("|", "\\|").replace("\n", " ")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def record_rollback(log: AuditLog, result, *, actor: str, run_id: str | None = None) -> int | None:
    """An entry for a champion rollback that happened (``RollbackResult.action == 'rolled_back'``)."""
    if result.action != "rolled_back":
        return None
    return log.record("rollback", result.model, result.to_version, result.from_version, actor=actor,
                      reason=result.reason, run_id=run_id)
