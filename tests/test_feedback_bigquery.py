"""The cloud feedback store: request records in BigQuery, loaded exactly once.

BigQuery is a service outside this machine, so these tests run ``BigQueryFeedbackStore``
against ``FakeBigQuery`` (tests/bigquery_fake.py), a fake of ``google.cloud.bigquery.Client``
that executes the store's few statements with BigQuery's transaction semantics and refuses any
other SQL. The exactly-once contract every store keeps is tested in test_feedback.py; here,
what is particular to BigQuery: tables and schema, the load script, rollback, the profile.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import dagster as dg
import pytest
from bigquery_fake import PROJECT, REQUESTS, STATE, FakeBigQuery, FakeBigQueryResource, fake_bigquery, fake_store
from dagster_gcp import BigQueryResource
from google.api_core.exceptions import BadRequest
from google.cloud import bigquery

from genops_assets.defs.feedback.assets import request_log
from genops_assets.lib.feedback import COLUMNS, read_new_records
from resources import build_resources
from resources.feedback_store import BigQueryFeedbackStore, DuckDBFeedbackStore
from resources.paths import GenopsHome


@pytest.fixture()
def bq():
    with fake_bigquery() as fake:
        yield fake



def rec(i: int, **kw) -> str:
    base = {"ts": 1_790_000_000 + i, "request_id": f"r{i}", "model": "champion", "version": "3", "status": 200,
            "prompt_tokens": 10 + i, "completion_tokens": 5, "latency_s": 0.5, "prompt_version": "1"}
    return json.dumps({**base, **kw}) + "\n"


def request_ids(bq: FakeBigQuery) -> list[str]:
    return sorted(r["request_id"] for r in bq.tables[REQUESTS])


def test_dataset_and_tables_are_created_with_the_schema_mapped_from_the_columns(bq):
    assert fake_store().offset("requests.jsonl") == 0
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
    assert fake_store().count() == 1  # kept, not recreated
    names = [f.name for f in bq.schemas[REQUESTS]]
    assert names[:2] == ["request_id", "ts"] and set(names) == {n for n, _ in COLUMNS} | {"loaded_at"}


def test_a_load_is_one_transaction_script_with_values_as_parameters(bq, tmp_path):
    log = tmp_path / "requests.jsonl"
    log.write_text(rec(1) + rec(2))
    chunk = read_new_records(log, 0)
    assert fake_store().append(str(log), chunk, COLUMNS) == 2
    row = next(r for r in bq.tables[REQUESTS] if r["request_id"] == "r1")
    assert row["ts"] == datetime.fromtimestamp(1_790_000_001, tz=UTC) and row["source_offset"] == 0

    [(sql, params)] = bq.appended_scripts()
    assert params == {"source": ("STRING", str(log)), "end_offset": ("INT64", chunk.end), "rotated": ("BOOL", False)}
    assert str(log) not in sql and "r1" not in sql  # values travel as parameters or load data only
    assert sql.index("BEGIN TRANSACTION") < sql.index(f"INSERT INTO `{REQUESTS}`") \
        < sql.index(f"MERGE `{STATE}`") < sql.index("COMMIT TRANSACTION")
    assert f"FROM `{STATE}` WHERE source = @source" in sql  # the offset is read again inside the transaction
    assert [k for k in bq.schemas if "requests_load_" in k] == []  # staging tables dropped


def test_a_failure_between_insert_and_offset_update_commits_nothing(bq, tmp_path):
    log = tmp_path / "requests.jsonl"
    log.write_text(rec(1) + rec(2))
    s = fake_store()
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
    s = fake_store()
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
    res = {"feedback_store": fake_store(), "home": GenopsHome(root=str(tmp_path))}

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
