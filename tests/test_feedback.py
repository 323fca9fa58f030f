"""The feedback store: request records loaded exactly once, by every FeedbackStore implementation
(DuckDB, and BigQuery through a fake of its client); through the request_log asset into DuckDB,
torn and malformed lines handled, rotation detected, the redaction hook applied before storage."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import dagster as dg
import pytest
from bigquery_fake import REQUESTS, fake_bigquery, fake_store

from genops_assets.defs.feedback.assets import request_log
from genops_assets.lib.feedback import COLUMNS, Chunk, load_redactor, read_new_records
from resources.feedback_store import DuckDBFeedbackStore, FeedbackStore
from resources.paths import GenopsHome
from resources.warehouse import DuckDBWarehouse


def mask_user(record: dict) -> dict:
    """A redactor for the test: drops the user field."""
    return {**record, "user": "[redacted]"} if "user" in record else record


def rec(i: int, **kw) -> str:
    base = {"ts": 1_790_000_000 + i, "request_id": f"r{i}", "model": "champion", "version": "3", "status": 200,
            "prompt_tokens": 10 + i, "completion_tokens": 5, "latency_s": 0.5, "prompt_version": "1"}
    return json.dumps({**base, **kw}) + "\n"


def run(tmp_path):
    wh = DuckDBWarehouse(path=str(tmp_path / "w.duckdb"))
    store = DuckDBFeedbackStore(warehouse=wh, redactor="test_feedback:mask_user")
    res = {"warehouse": wh, "feedback_store": store, "home": GenopsHome(root=str(tmp_path))}
    result = dg.materialize([request_log], resources=res)
    assert result.success
    return result.output_for_node("request_log"), res["warehouse"]


def test_records_load_once_with_torn_lines_rotation_and_redaction(tmp_path):
    log = tmp_path / "endpoint" / "requests.jsonl"
    log.parent.mkdir(parents=True)
    torn = rec(3)
    log.write_text(rec(1, user="alice@example.com") + "not json\n" + rec(2, status=404, error="unknown model")
                   + torn[:20])
    out, wh = run(tmp_path)
    assert out == {"loaded": 2, "total": 2, "offset": out["offset"], "malformed": 1}
    df = wh.query_df("select * from feedback.requests order by request_id")
    assert list(df["request_id"]) == ["r1", "r2"] and list(df["status"]) == [200, 404]
    assert df.loc[0, "adapter_version"] == "3" and df.loc[0, "prompt_version"] == "1"
    assert json.loads(df.loc[0, "record_json"])["user"] == "[redacted]"  # stored after redaction

    with open(log, "a") as fh:  # the torn line completes, one more arrives
        fh.write(torn[20:] + rec(4))
    out, wh = run(tmp_path)
    assert out["loaded"] == 2 and out["total"] == 4
    out, _ = run(tmp_path)
    assert out["loaded"] == 0 and out["total"] == 4  # nothing twice

    log.write_text(rec(5))  # rotated: a new, shorter file
    out, wh = run(tmp_path)
    assert out["loaded"] == 1 and out["total"] == 5


def test_redactor_spec_errors_are_clear():
    with pytest.raises(ValueError, match="module:function"):
        load_redactor("nocolon")
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_redactor("test_feedback:missing")


@dataclass
class StoreUnderTest:
    store: FeedbackStore
    request_ids: Callable[[], list[str]]  # what the store's requests table holds, sorted


@pytest.fixture(params=["duckdb", "bigquery"])
def feedback_store(request, tmp_path):
    """Each FeedbackStore implementation; BigQuery through the fake of its client."""
    if request.param == "duckdb":
        wh = DuckDBWarehouse(path=str(tmp_path / "w.duckdb"))
        yield StoreUnderTest(DuckDBFeedbackStore(warehouse=wh), lambda: sorted(
            wh.query_df("select request_id from feedback.requests")["request_id"]))
    else:
        with fake_bigquery() as bq:
            yield StoreUnderTest(fake_store(), lambda: sorted(r["request_id"] for r in bq.tables[REQUESTS]))


def test_overlapping_ingestions_load_each_line_once(feedback_store, tmp_path):
    """Two ingestions that read the log from the same offset (say, two runs started by the
    sensor): the second commit keeps only the lines the first did not load."""
    s = feedback_store.store
    log = tmp_path / "requests.jsonl"
    log.write_text(rec(1) + rec(2))
    assert s.offset(str(log)) == 0 and s.count() == 0
    first = read_new_records(log, 0)
    with open(log, "a") as fh:
        fh.write(rec(3))
    second = read_new_records(log, 0)  # read before the first committed
    assert s.append(str(log), first, COLUMNS) == 2
    assert s.append(str(log), second, COLUMNS) == 1
    assert feedback_store.request_ids() == ["r1", "r2", "r3"]
    assert s.offset(str(log)) == log.stat().st_size and s.count() == 3


def test_rotation_keeps_every_row_of_the_new_file_even_below_the_stored_offset(feedback_store, tmp_path):
    s = feedback_store.store
    source = str(tmp_path / "requests.jsonl")
    s.append(source, Chunk([], 0, 500, False, []), COLUMNS)
    row = {"request_id": "r9", "ts": None, "event": "request", "model": "m", "adapter_version": None,
           "prompt_version": None, "status": 200, "error": None, "latency_s": 0.1, "queue_s": 0.0,
           "prompt_tokens": 1, "completion_tokens": 1, "finish_reason": None, "input_text": None,
           "response_text": None, "source_file": "requests.jsonl", "source_offset": 0, "record_json": "{}",
           "task": None}
    assert list(row) == [n for n, _ in COLUMNS]
    # A rotated file's first line, at offset 0, far below the 500 bytes stored for the old file.
    assert s.append(source, Chunk([tuple(row.values())], 0, 40, True, []), COLUMNS) == 1
    assert s.offset(source) == 40 and feedback_store.request_ids() == ["r9"]


def test_live_question_and_answer_are_stored(tmp_path):
    log = tmp_path / "endpoint" / "requests.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text(rec(1, prompt_variables={"message": "camera offline"}, response='{"category": "x"}')
                   + rec(2, messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "hub?"}]))
    _, wh = run(tmp_path)
    df = wh.query_df("select input_text, response_text from feedback.requests order by request_id")
    assert list(df["input_text"]) == ["camera offline", "hub?"]
    assert df.loc[0, "response_text"] == '{"category": "x"}' and df.loc[1, "response_text"] is None
