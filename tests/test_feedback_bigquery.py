"""The cloud feedback store: request records in BigQuery, loaded exactly once.

BigQuery is a service outside this machine, so these tests run ``BigQueryFeedbackStore``
against ``FakeBigQuery``, a small fake of ``google.cloud.bigquery.Client`` written here. It
records every SQL text with its query parameters, keeps datasets, table schemas, rows and
offsets in Python, and executes the few statements the store issues with the semantics the
store relies on: the changes between ``BEGIN TRANSACTION`` and ``COMMIT TRANSACTION`` become
visible together, and a failing statement (or a script that ends before its commit) rolls
them all back. It refuses SQL it does not know and any ``@name`` without a parameter, so a
changed statement fails here rather than passing unexamined. The store receives it through a
``BigQueryResource`` whose ``get_client`` yields it.
"""

from __future__ import annotations

import copy
import json
import re
from contextlib import contextmanager
from datetime import datetime, timezone

import dagster as dg
import pytest
from dagster_gcp import BigQueryResource
from google.api_core.exceptions import BadRequest, Conflict, NotFound
from google.cloud import bigquery

from genops_assets.defs.feedback.assets import request_log
from genops_assets.lib.feedback import COLUMNS, Chunk, read_new_records
from resources import build_resources
from resources.feedback_store import BigQueryFeedbackStore, DuckDBFeedbackStore
from resources.paths import GenopsHome

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
        params = {p.name: (p.type_, p.value) for p in (job_config.query_parameters if job_config else [])}
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
        else:
            raise AssertionError(f"FakeBigQuery does not know this statement:\n{s}")


def _now() -> datetime:
    return datetime.now(timezone.utc)


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


@pytest.fixture()
def bq():
    FAKES[PROJECT] = fake = FakeBigQuery()
    yield fake
    FAKES.pop(PROJECT, None)


def store(location: str | None = "EU") -> BigQueryFeedbackStore:
    return BigQueryFeedbackStore(bigquery=FakeBigQueryResource(project=PROJECT, location=location))


def rec(i: int, **kw) -> str:
    base = {"ts": 1_790_000_000 + i, "request_id": f"r{i}", "model": "champion", "version": "3", "status": 200,
            "prompt_tokens": 10 + i, "completion_tokens": 5, "latency_s": 0.5, "prompt_version": "1"}
    return json.dumps({**base, **kw}) + "\n"


def request_ids(bq: FakeBigQuery) -> list[str]:
    return sorted(r["request_id"] for r in bq.tables[REQUESTS])


def test_dataset_and_tables_are_created_with_the_schema_mapped_from_the_columns(bq):
    assert store().offset("requests.jsonl") == 0
    assert bq.datasets == {f"{PROJECT}.genops_feedback": "EU"}
    requests = {f.name: f.field_type for f in bq.schemas[REQUESTS]}
    assert list(requests) == [n for n, _ in COLUMNS] + ["loaded_at"]
    assert {k: requests[k] for k in ("request_id", "ts", "status", "latency_s", "source_offset", "loaded_at")} == {
        "request_id": "STRING", "ts": "TIMESTAMP", "status": "INT64", "latency_s": "FLOAT64",
        "source_offset": "INT64", "loaded_at": "TIMESTAMP"}
    assert set(requests.values()) == {"STRING", "TIMESTAMP", "INT64", "FLOAT64"}
    assert [(f.name, f.field_type, f.mode) for f in bq.schemas[STATE]] == [
        ("source", "STRING", "REQUIRED"), ("byte_offset", "INT64", "REQUIRED"), ("updated_at", "TIMESTAMP", "NULLABLE")]


def test_a_requests_table_from_an_older_genops_gains_the_new_columns(bq):
    bq.datasets[f"{PROJECT}.genops_feedback"] = "EU"
    bq.create_table(bigquery.Table(REQUESTS, schema=[bigquery.SchemaField("request_id", "STRING"),
                                                     bigquery.SchemaField("ts", "TIMESTAMP")]))
    bq.tables[REQUESTS].append({"request_id": "old", "ts": None})
    assert store().count() == 1  # kept, not recreated
    names = [f.name for f in bq.schemas[REQUESTS]]
    assert names[:2] == ["request_id", "ts"] and set(names) == {n for n, _ in COLUMNS} | {"loaded_at"}


def test_overlapping_ingestions_load_each_line_once(bq, tmp_path):
    """Two ingestions that read the log from the same offset: the second transaction keeps only
    the lines the first did not load (same scenario as the DuckDB store's test)."""
    log = tmp_path / "requests.jsonl"
    log.write_text(rec(1) + rec(2))
    s = store()
    first = read_new_records(log, 0)
    with open(log, "a") as fh:
        fh.write(rec(3))
    second = read_new_records(log, 0)  # read before the first committed
    assert s.append(str(log), first, COLUMNS) == 2
    assert s.append(str(log), second, COLUMNS) == 1
    assert request_ids(bq) == ["r1", "r2", "r3"]
    assert s.offset(str(log)) == log.stat().st_size and s.count() == 3
    row = next(r for r in bq.tables[REQUESTS] if r["request_id"] == "r1")
    assert row["ts"] == datetime.fromtimestamp(1_790_000_001, tz=timezone.utc) and row["source_offset"] == 0

    scripts = bq.appended_scripts()
    assert len(scripts) == 2
    for sql, params in scripts:
        assert params == {"source": ("STRING", str(log)), "end_offset": ("INT64", params["end_offset"][1]),
                          "rotated": ("BOOL", False)}
        assert str(log) not in sql and "r1" not in sql  # values travel as parameters or load data only
        assert sql.index("BEGIN TRANSACTION") < sql.index(f"INSERT INTO `{REQUESTS}`") \
            < sql.index(f"MERGE `{STATE}`") < sql.index("COMMIT TRANSACTION")
        assert f"FROM `{STATE}` WHERE source = @source" in sql
    assert [p["end_offset"][1] for _, p in scripts] == [first.end, second.end]
    assert [k for k in bq.schemas if "requests_load_" in k] == []  # staging tables dropped


def test_a_failure_between_insert_and_offset_update_commits_nothing(bq, tmp_path):
    log = tmp_path / "requests.jsonl"
    log.write_text(rec(1) + rec(2))
    s = store()
    chunk = read_new_records(log, s.offset(str(log)))
    bq.fail_at = "MERGE"
    with pytest.raises(BadRequest, match="injected failure"):
        s.append(str(log), chunk, COLUMNS)
    assert bq.executed[-1].startswith(f"INSERT INTO `{REQUESTS}`") or bq.executed[-1].startswith("SET loaded")
    assert any(s.startswith(f"INSERT INTO `{REQUESTS}`") for s in bq.executed)  # the insert ran ...
    assert s.count() == 0 and s.offset(str(log)) == 0  # ... and was rolled back with the offset
    assert [k for k in bq.schemas if "requests_load_" in k] == []

    bq.fail_at = None  # the next run loads the same lines, once
    assert s.append(str(log), read_new_records(log, s.offset(str(log))), COLUMNS) == 2
    assert s.append(str(log), read_new_records(log, s.offset(str(log))), COLUMNS) == 0
    assert request_ids(bq) == ["r1", "r2"] and s.offset(str(log)) == log.stat().st_size


def test_a_chunk_of_only_malformed_lines_moves_the_offset_without_a_load(bq, tmp_path):
    log = tmp_path / "requests.jsonl"
    log.write_text("not json\n")
    s = store()
    chunk = read_new_records(log, 0)
    assert chunk.rows == [] and chunk.malformed
    assert s.append(str(log), chunk, COLUMNS) == 0
    sql, _ = bq.appended_scripts()[-1]
    assert "INSERT INTO" not in sql and s.offset(str(log)) == chunk.end and s.count() == 0


def test_request_log_asset_on_bigquery_torn_lines_rotation_and_nothing_twice(bq, tmp_path):
    log = tmp_path / "endpoint" / "requests.jsonl"
    log.parent.mkdir(parents=True)
    torn = rec(3)
    log.write_text(rec(1) + "not json\n" + rec(2, status=404, error="unknown model") + torn[:20])
    res = {"feedback_store": store(), "home": GenopsHome(root=str(tmp_path))}

    def run():
        result = dg.materialize([request_log], resources=res)
        assert result.success
        mat = result.asset_materializations_for_node("request_log")[0]
        assert mat.metadata["table"].value == REQUESTS
        return result.output_for_node("request_log")

    out = run()
    assert out == {"loaded": 2, "total": 2, "offset": out["offset"], "malformed": 1}
    assert {r["request_id"]: r["status"] for r in bq.tables[REQUESTS]} == {"r1": 200, "r2": 404}
    with open(log, "a") as fh:  # the torn line completes, one more arrives
        fh.write(torn[20:] + rec(4))
    assert run()["loaded"] == 2
    out = run()
    assert out["loaded"] == 0 and out["total"] == 4  # nothing twice
    before = res["feedback_store"].offset(str(log))

    log.write_text(rec(5))  # rotated: a new, shorter file
    out = run()
    assert out["loaded"] == 1 and out["total"] == 5 and request_ids(bq) == ["r1", "r2", "r3", "r4", "r5"]
    _, params = bq.appended_scripts()[-1]
    assert params["rotated"] == ("BOOL", True)
    after = res["feedback_store"].offset(str(log))
    assert after == log.stat().st_size < before  # the offset starts over with the new file


def test_rotation_keeps_every_row_of_the_new_file_even_below_the_stored_offset(bq, tmp_path):
    s = store()
    source = str(tmp_path / "requests.jsonl")
    s.append(source, Chunk([], 0, 500, False, []), COLUMNS)
    rows = [("r9", None, "request", "m", None, None, 200, None, 0.1, 0.0, 1, 1, None, None, None,
             "requests.jsonl", 0, "{}")]
    assert s.append(source, Chunk(rows, 0, 40, True, []), COLUMNS) == 1
    assert s.offset(source) == 40


def test_unknown_column_type_is_named():
    from resources.feedback_store import bigquery_type

    with pytest.raises(ValueError, match="column 'x': no BigQuery type for 'blob'"):
        bigquery_type("x", "blob")


def test_profile_wiring_and_the_missing_project_error(tmp_path, monkeypatch):
    monkeypatch.delenv("GENOPS_FEEDBACK_STORE", raising=False)
    local = build_resources(home=tmp_path)["feedback_store"]
    assert isinstance(local, DuckDBFeedbackStore) and local.warehouse.path == str(tmp_path / "warehouse.duckdb")

    monkeypatch.setenv("GENOPS_FEEDBACK_STORE", "bigquery")
    monkeypatch.delenv("GENOPS_GCP_PROJECT", raising=False)
    with pytest.raises(ValueError, match="GENOPS_GCP_PROJECT"):
        build_resources(home=tmp_path)

    monkeypatch.setenv("GENOPS_GCP_PROJECT", "acme-genops")
    monkeypatch.setenv("GENOPS_BQ_DATASET", "feedback_eu")
    monkeypatch.setenv("GENOPS_BQ_LOCATION", "europe-west4")
    monkeypatch.setenv("GENOPS_GCP_CREDENTIALS", "c2VjcmV0")
    cloud = build_resources(home=tmp_path)["feedback_store"]
    key = cloud.bigquery.gcp_credentials  # read from the environment at run time, never copied into config
    assert isinstance(key, dg.EnvVar) and key == "GENOPS_GCP_CREDENTIALS"
    assert isinstance(cloud, BigQueryFeedbackStore) and isinstance(cloud.bigquery, BigQueryResource)
    assert (cloud.bigquery.project, cloud.bigquery.location, cloud.dataset) == ("acme-genops", "europe-west4",
                                                                               "feedback_eu")
    assert cloud.table_ref == "acme-genops.feedback_eu.requests"

    monkeypatch.setenv("GENOPS_FEEDBACK_STORE", "sqlite")
    with pytest.raises(ValueError, match="GENOPS_FEEDBACK_STORE must be 'duckdb' or 'bigquery'"):
        build_resources(home=tmp_path)


def test_a_dataset_name_that_could_break_out_of_the_sql_is_refused(bq):
    bad = BigQueryFeedbackStore(bigquery=FakeBigQueryResource(project=PROJECT), dataset="x`; DROP TABLE y")
    with pytest.raises(ValueError, match="letters, digits and underscores"):
        bad.count()
