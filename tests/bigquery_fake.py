"""A fake of ``google.cloud.bigquery.Client``, just enough for the BigQuery feedback store.

BigQuery is a service outside this machine, so tests run ``BigQueryFeedbackStore`` against
``FakeBigQuery``. It records every SQL text with its query parameters, keeps datasets, table
schemas, rows and offsets in Python, and executes the few statements the store issues with the
semantics the store relies on: the changes between ``BEGIN TRANSACTION`` and ``COMMIT
TRANSACTION`` become visible together, and a failing statement (or a script that ends before
its commit) rolls them all back. It refuses SQL it does not know and any ``@name`` without a
parameter, so a changed statement fails rather than passing unexamined. The store receives it
through a ``BigQueryResource`` whose ``get_client`` yields it.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from dagster_gcp import BigQueryResource
from google.api_core.exceptions import BadRequest, Conflict, NotFound
from google.cloud import bigquery

from resources.feedback_store import BigQueryFeedbackStore

PROJECT = "genops-test"
REQUESTS = f"{PROJECT}.genops_feedback.requests"
STATE = f"{PROJECT}.genops_feedback.ingest_state"


class FakeJob:
    def __init__(self, rows=()):
        self._rows = list(rows)

    def result(self):
        return self._rows


class FakeBigQuery:
    """Just enough of ``bigquery.Client`` for the feedback store, with transactions."""

    def __init__(self, project: str = PROJECT):
        self.project = project
        self.datasets: dict[str, str | None] = {}  # id -> location
        self.schemas: dict[str, list[bigquery.SchemaField]] = {}
        self.tables: dict[str, list[dict]] = {}
        self.expires: dict[str, datetime | None] = {}
        self.queries: list[tuple[str, dict[str, tuple[str, object]]]] = []
        self.fail_at: str | None = None  # a statement starting with this fails
        self.executed: list[str] = []

    # datasets and tables

    def get_dataset(self, ref: str):
        if ref not in self.datasets:
            raise NotFound(f"dataset {ref}")
        return ref

    def create_dataset(self, ds: bigquery.Dataset, exists_ok: bool = False):
        key = f"{ds.project}.{ds.dataset_id}"
        if key in self.datasets and not exists_ok:
            raise Conflict(f"dataset {key}")
        self.datasets.setdefault(key, ds.location)
        return ds

    def get_table(self, ref: str) -> bigquery.Table:
        if ref not in self.schemas:
            raise NotFound(f"table {ref}")
        return bigquery.Table(ref, schema=list(self.schemas[ref]))

    def create_table(self, table: bigquery.Table, exists_ok: bool = False):
        key = f"{table.project}.{table.dataset_id}.{table.table_id}"
        if f"{table.project}.{table.dataset_id}" not in self.datasets:
            raise NotFound(f"dataset of {key}")
        if key in self.schemas:
            if exists_ok:
                return self.get_table(key)
            raise Conflict(f"table {key}")
        self.schemas[key], self.tables[key], self.expires[key] = list(table.schema), [], table.expires
        return table

    def update_table(self, table: bigquery.Table, fields):
        assert list(fields) == ["schema"]
        key = f"{table.project}.{table.dataset_id}.{table.table_id}"
        self.schemas[key] = list(table.schema)
        return table

    def delete_table(self, ref: str, not_found_ok: bool = False):
        if ref not in self.schemas and not not_found_ok:
            raise NotFound(f"table {ref}")
        for store in (self.schemas, self.tables, self.expires):
            store.pop(ref, None)

    def load_table_from_json(self, rows, destination: str, job_config: bigquery.LoadJobConfig):
        if destination not in self.schemas:
            raise NotFound(f"table {destination}")
        schema = {f.name: f.field_type for f in job_config.schema}
        assert schema == {f.name: f.field_type for f in self.schemas[destination]}
        for row in rows:
            json.dumps(row)  # what the client sends is JSON
            assert set(row) <= set(schema), set(row) - set(schema)
            self.tables[destination].append({n: _from_json(schema[n], row.get(n)) for n in schema})
        return FakeJob()

    # queries

    def query(self, sql: str, job_config: bigquery.QueryJobConfig | None = None):
        params = {p.name: _typed(p) for p in (job_config.query_parameters if job_config else [])}
        self.queries.append((sql, params))
        used = set(re.findall(r"(?<!@)@(\w+)", sql))
        assert used <= set(params), f"unbound parameters {used - set(params)} in {sql}"
        values = {name: value for name, (_, value) in params.items()}
        statements = [s.strip() for s in sql.split(";") if s.strip()]
        script = _Script(self, values)
        try:
            for statement in statements:
                script.run(statement)
        finally:
            script.work = None  # not committed: rolled back
        return FakeJob(script.result)

    def appended_scripts(self) -> list[tuple[str, dict]]:
        return [(sql, p) for sql, p in self.queries if "BEGIN TRANSACTION" in sql]


class _Script:
    """One query job: statements share variables and, between BEGIN and COMMIT, a working copy."""

    def __init__(self, bq: FakeBigQuery, params: dict):
        self.bq, self.params, self.vars = bq, params, {}
        self.work: dict[str, list[dict]] | None = None
        self.row_count = 0
        self.result: list[tuple] = []

    def _rows(self, table: str) -> list[dict]:
        tables = self.work if self.work is not None else self.bq.tables
        if table not in tables:
            raise NotFound(f"table {table}")
        return tables[table]

    def _stored(self, state: str) -> int | None:
        offsets = [r["byte_offset"] for r in self._rows(state) if r["source"] == self.params["source"]]
        return max(offsets) if offsets else None

    def run(self, s: str) -> None:
        if self.bq.fail_at and s.startswith(self.bq.fail_at):
            raise BadRequest(f"injected failure at: {s[:40]}")
        self._run(s)
        self.bq.executed.append(s)

    def _run(self, s: str) -> None:
        p = self.params
        if m := re.fullmatch(r"DECLARE (\w+) INT64 DEFAULT 0", s):
            self.vars[m[1]] = 0
        elif s == "BEGIN TRANSACTION":
            assert self.work is None, "nested transaction"
            self.work = copy.deepcopy(self.bq.tables)
        elif s == "COMMIT TRANSACTION":
            assert self.work is not None, "commit without a transaction"
            self.bq.tables, self.work = self.work, None
        elif m := re.fullmatch(r"SET (\w+) = @@row_count", s):
            self.vars[m[1]] = self.row_count
        elif m := re.fullmatch(r"SELECT (\w+)", s):
            self.result = [(self.vars[m[1]],)]
        elif m := re.fullmatch(r"SELECT MAX\(byte_offset\) FROM `([^`]+)` WHERE source = @source", s):
            self.result = [(self._stored(m[1]),)]
        elif m := re.fullmatch(r"SELECT COUNT\(\*\) FROM `([^`]+)`", s):
            self.result = [(len(self._rows(m[1])),)]
        elif m := re.fullmatch(r"INSERT INTO `([^`]+)` \(source, byte_offset, updated_at\) SELECT @source, 0, "
                               r"CURRENT_TIMESTAMP\(\) FROM UNNEST\(\[1\]\) WHERE NOT EXISTS "
                               r"\(SELECT 1 FROM `([^`]+)` WHERE source = @source\)", s):
            assert m[1] == m[2]
            if self._stored(m[1]) is None:
                self._rows(m[1]).append({"source": p["source"], "byte_offset": 0, "updated_at": _now()})
        elif m := re.fullmatch(r"INSERT INTO `([^`]+)` \(([\w, ]+), loaded_at\)\s+"
                               r"SELECT ([\w, ]+), CURRENT_TIMESTAMP\(\) FROM `([^`]+)`\s+"
                               r"WHERE @rotated OR source_offset >= IFNULL\(\(SELECT MAX\(byte_offset\) "
                               r"FROM `([^`]+)` WHERE source = @source\), 0\)", s):
            target, cols, selected, staging, state = m.groups()
            assert cols == selected
            stored = self._stored(state) or 0
            new = [r for r in self._rows(staging) if p["rotated"] or r["source_offset"] >= stored]
            names = cols.split(", ")
            self._rows(target).extend({**{n: r[n] for n in names}, "loaded_at": _now()} for r in new)
            self.row_count = len(new)
        elif m := re.fullmatch(
                r"MERGE `([^`]+)` AS target\s+"
                r"USING \(SELECT @source AS source, @end_offset AS byte_offset\) AS incoming\s+"
                r"ON target.source = incoming.source\s+"
                r"WHEN MATCHED THEN UPDATE SET byte_offset = IF\(@rotated, incoming.byte_offset, "
                r"GREATEST\(target.byte_offset, incoming.byte_offset\)\), updated_at = CURRENT_TIMESTAMP\(\)\s+"
                r"WHEN NOT MATCHED THEN INSERT \(source, byte_offset, updated_at\) "
                r"VALUES \(incoming.source, incoming.byte_offset, CURRENT_TIMESTAMP\(\)\)", s):
            rows = [r for r in self._rows(m[1]) if r["source"] == p["source"]]
            for r in rows:
                r["byte_offset"] = p["end_offset"] if p["rotated"] else max(r["byte_offset"], p["end_offset"])
                r["updated_at"] = _now()
            if not rows:
                self._rows(m[1]).append({"source": p["source"], "byte_offset": p["end_offset"], "updated_at": _now()})
        elif m := re.fullmatch(r"select ([\w, ]+) from `([^`]+)`(?: where (.+?))?(?: order by ([\w, ]+?))?"
                               r"(?: limit (\d+))?", s):
            self.result = self._select(m[1].split(", "), m[2], m[3], m[4], m[5])
        else:
            raise AssertionError(f"FakeBigQuery does not know this statement:\n{s}")

    # The WHERE conditions a RequestQuery writes, each with BigQuery's meaning; any other fails.
    _CONDITIONS = (
        (r"coalesce\(event, 'request'\) = 'request'", lambda r, p, m: (r.get("event") or "request") == "request"),
        (r"status = @(\w+)", lambda r, p, m: r["status"] == p[m[1]]),
        (r"ts >= @(\w+)", lambda r, p, m: r["ts"] is not None and r["ts"] >= p[m[1]]),
        (r"ts < @(\w+)", lambda r, p, m: r["ts"] is not None and r["ts"] < p[m[1]]),
        (r"\(task = @(\w+) or task is null\)", lambda r, p, m: r["task"] is None or r["task"] == p[m[1]]),
        (r"request_id in UNNEST\(@(\w+)\)", lambda r, p, m: r["request_id"] in p[m[1]]),
        (r"(\w+) is not null", lambda r, p, m: r[m[1]] is not None),
        (r"trim\((\w+)\) <> ''", lambda r, p, m: r[m[1]] is not None and r[m[1]].strip() != ""),
    )

    def _select(self, columns, table, where, order, limit) -> list[tuple]:
        rows = list(self._rows(table))
        for condition in (where.split(" and ") if where else []):
            for pattern, keep in self._CONDITIONS:
                if m := re.fullmatch(pattern, condition):
                    rows = [r for r in rows if keep(r, self.params, m)]
                    break
            else:
                raise AssertionError(f"FakeBigQuery does not know this condition: {condition}")
        for term in reversed(order.split(", ") if order else []):  # stable sorts, last key first
            name, _, direction = term.partition(" ")
            # BigQuery orders NULLs first ascending, last descending.
            rows.sort(key=lambda r, n=name: (r[n] is not None, r[n] if r[n] is not None else 0),
                      reverse=direction == "desc")
        if limit is not None:
            rows = rows[:int(limit)]
        return [tuple(r[c] for c in columns) for r in rows]


def _typed(p) -> tuple[str, object]:
    if isinstance(p, bigquery.ArrayQueryParameter):
        return f"ARRAY<{p.array_type}>", list(p.values)
    return p.type_, p.value


def _now() -> datetime:
    return datetime.now(UTC)


def _from_json(kind: str, value):
    if value is None:
        return None
    if kind == "TIMESTAMP":
        return datetime.fromisoformat(value)
    return {"STRING": str, "INT64": int, "FLOAT64": float}[kind](value)


class FakeBigQueryResource(BigQueryResource):
    """A BigQueryResource whose client is the fake registered for its project."""

    @contextmanager
    def get_client(self):
        yield FAKES[self.project]


FAKES: dict[str, FakeBigQuery] = {}


@contextmanager
def fake_bigquery() -> Iterator[FakeBigQuery]:
    """A fresh fake, the client of every ``FakeBigQueryResource`` of ``PROJECT`` meanwhile."""
    FAKES[PROJECT] = fake = FakeBigQuery()
    try:
        yield fake
    finally:
        FAKES.pop(PROJECT, None)


def fake_store(location: str | None = "EU") -> BigQueryFeedbackStore:
    return BigQueryFeedbackStore(bigquery=FakeBigQueryResource(project=PROJECT, location=location))
