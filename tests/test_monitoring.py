"""Serving monitoring: statistics of a request log checked against hand-computed values, task
health of live answers, empty days, the daily assets over a DuckDB feedback store, and the
endpoint's resource sampler."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from genops_assets.defs.monitoring.common import daily_partitions
from genops_assets.defs.monitoring.serving import build_resource_usage, build_serving_monitoring_assets
from genops_assets.lib.feedback import COLUMNS, Chunk, to_row
from genops_assets.lib.monitoring import (
    SERVING_COLUMNS,
    check_answer,
    read_resource_samples,
    serving_report,
    summarize_resources,
)
from genops_assets.lib.output_schema import OutputSchema
from genops_assets.lib.stats import percentile
from genops_assets.lib.tasks import TaskRef
from genops_assets.serving.sampler import ResourceSampler, interval_from_env, sampler_lifespan
from resources.feedback_store import DuckDBFeedbackStore
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking
from resources.warehouse import DuckDBWarehouse, monitoring_schema

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
DAY = "2026-03-02"
START = datetime(2026, 3, 2, tzinfo=UTC)
END = START + timedelta(days=1)
T0 = START.timestamp()
SCHEMA = json.loads((ROOT / "tasks" / "support_triage" / "output_schema.json").read_text())

GOOD = '{"category": "billing", "priority": "low", "product": "hub", "summary": "Refund the double charge"}'
PROSE = 'Sure! {"category": "billing", "priority": "low", "product": "hub", "summary": "Double charge"}'
BAD_LABEL = '{"category": "weather", "priority": "low", "product": "hub", "summary": "s"}'


def _rec(i: str, t: float, served: str | None, version: str | None, status: int, **kw) -> dict:
    return {"request_id": i, "ts": T0 + t, "model": kw.pop("model", served), "served_by": served,
            "version": version, "prompt_version": kw.pop("prompt", "1" if version else None), "status": status, **kw}


def records() -> list[dict]:
    """Champion v3 (five requests, two failed), a canary answer by challenger v4 (two, one
    cancelled), a guided base request, a reload, and two requests outside the day."""
    return [
        {"ts": T0 + 50, "event": "reload", "model": "champion", "version": "3"},
        _rec("a1", 100, "champion", "3", 200, latency_s=0.2, queue_s=0.01, prompt_tokens=10, completion_tokens=20,
             response=GOOD),
        _rec("a2", 200, "champion", "3", 200, latency_s=0.4, queue_s=0.03, prompt_tokens=20, completion_tokens=30,
             response=PROSE),
        _rec("a3", 300, "champion", "3", 200, latency_s=1.0, queue_s=0.05, prompt_tokens=30, completion_tokens=10,
             response=BAD_LABEL),
        _rec("a4", 400, "champion", "3", 504, latency_s=600.0, prompt_tokens=40, completion_tokens=5,
             error="Request timed out after 600 s"),
        _rec("a5", 500, "champion", "3", 500, error="generation failed: boom"),
        _rec("b1", 1000, "challenger", "4", 200, model="champion", latency_s=0.3, queue_s=0.02, prompt_tokens=12,
             completion_tokens=8, response="not json"),
        _rec("b2", 1100, "challenger", "4", 499, model="champion", latency_s=2.0, prompt_tokens=12,
             completion_tokens=3, error="client disconnected"),
        _rec("c1", 2000, "base", None, 200, latency_s=0.1, queue_s=0.0, prompt_tokens=5, completion_tokens=1,
             response="billing", guided=True),
        _rec("early", -10, "champion", "3", 200, latency_s=9.0, prompt_tokens=1, completion_tokens=1, response=GOOD),
        _rec("late", 86_400 + 5, "champion", "3", 200, latency_s=9.0, prompt_tokens=1, completion_tokens=1,
             response=GOOD),
    ]


def frame(recs: list[dict]) -> pd.DataFrame:
    names = [n for n, _ in COLUMNS]
    return pd.DataFrame([to_row(r, "requests.jsonl", i) for i, r in enumerate(recs)], columns=names)


def by_name(report):
    return {g.served_by: g for g in report.groups}


def test_percentile_is_numpy_linear():
    # [1, 2, 3, 4], p25: position (4 - 1) * 0.25 = 0.75 -> 1 + 0.75 * (2 - 1) = 1.75
    assert percentile([4, 1, None, 3, 2], 25) == pytest.approx(1.75)
    assert percentile([7.5], 99) == 7.5
    assert percentile([], 50) is None and percentile([None, float("nan")], 50) is None


def test_overall_statistics_match_hand_computed_values():
    report = serving_report(frame(records()), START, END, OutputSchema(SCHEMA))
    o = report.overall
    assert report.reloads == 1
    # In the day: a1..a5, b1, b2, c1 = 8 requests; answered (200): a1 a2 a3 b1 c1 = 5
    assert (o.request_count, o.ok_count, o.error_count) == (8, 5, 3)
    assert o.error_rate == pytest.approx(0.375)  # 3 / 8
    assert o.errors_by_class == {"cancelled": 1, "server": 1, "timeout": 1}  # 499, 500, 504
    # Answered latencies sorted: 0.1 0.2 0.3 0.4 1.0 (n = 5)
    assert o.latency_p50_s == pytest.approx(0.3)  # h = 4 * 0.50 = 2 -> x[2]
    assert o.latency_p95_s == pytest.approx(0.88)  # h = 3.8 -> 0.4 + 0.8 * (1.0 - 0.4)
    assert o.latency_p99_s == pytest.approx(0.976)  # h = 3.96 -> 0.4 + 0.96 * 0.6
    assert o.latency_mean_s == pytest.approx(0.4)  # 2.0 / 5
    # Queue times sorted: 0.0 0.01 0.02 0.03 0.05
    assert o.queue_p50_s == pytest.approx(0.02)
    assert o.queue_p95_s == pytest.approx(0.046)  # 0.03 + 0.8 * (0.05 - 0.03)
    # Tokens: totals over all 8 requests (a5 recorded none), means over the 5 answered
    assert o.prompt_tokens_total == 129  # 10 + 20 + 30 + 40 + 12 + 12 + 5
    assert o.completion_tokens_total == 77  # 20 + 30 + 10 + 5 + 8 + 3 + 1
    assert o.prompt_tokens_mean == pytest.approx(15.4)  # (10 + 20 + 30 + 12 + 5) / 5
    assert o.completion_tokens_mean == pytest.approx(13.8)  # (20 + 30 + 10 + 8 + 1) / 5
    # Throughput over the whole day (86400 s) and over the active span (first 100 s, last 2000 s)
    assert o.window_s == 86_400.0
    assert o.requests_per_s == pytest.approx(8 / 86_400)
    assert o.output_tokens_per_s == pytest.approx(77 / 86_400)
    assert o.active_span_s == pytest.approx(1_900.0)
    assert o.active_requests_per_s == pytest.approx(8 / 1_900)
    assert o.active_output_tokens_per_s == pytest.approx(77 / 1_900)
    # Live answers checked: a1 a2 a3 b1 (c1 is a guided choice). Strict JSON: a1 a3; lenient: a1 a2 a3;
    # schema (the task's validator): strict a1, lenient a1 a2 ("weather" is no category)
    assert o.answers_checked == 4
    assert o.valid_json_rate == pytest.approx(0.5)  # 2 / 4
    assert o.json_found_rate == pytest.approx(0.75)  # 3 / 4
    assert o.schema_valid_rate == pytest.approx(0.25)  # 1 / 4
    assert o.schema_valid_lenient_rate == pytest.approx(0.5)  # 2 / 4


def test_groups_by_served_adapter_and_prompt_version():
    report = serving_report(frame(records()), START, END, OutputSchema(SCHEMA))
    assert [(g.served_by, g.adapter_version, g.prompt_version) for g in report.groups] == [
        ("base", "none", "none"), ("challenger", "4", "1"), ("champion", "3", "1")]
    groups = by_name(report)
    champ, chall, base = groups["champion"], groups["challenger"], groups["base"]
    assert (champ.request_count, champ.error_rate) == (5, pytest.approx(0.4))  # 2 of 5 failed
    assert champ.errors_by_class == {"server": 1, "timeout": 1}
    # champion answered latencies 0.2 0.4 1.0: p50 = x[1]; p95 at h = 1.9 -> 0.4 + 0.9 * 0.6
    assert champ.latency_p50_s == pytest.approx(0.4)
    assert champ.latency_p95_s == pytest.approx(0.94)
    assert champ.latency_p99_s == pytest.approx(0.988)  # h = 1.98 -> 0.4 + 0.98 * 0.6
    assert champ.valid_json_rate == pytest.approx(2 / 3)  # a1, a3 of a1 a2 a3
    # The canary answers were requested as champion but are counted for the adapter that answered
    assert (chall.request_count, chall.error_rate, chall.errors_by_class) == (2, 0.5, {"cancelled": 1})
    assert chall.latency_p50_s == pytest.approx(0.3) and chall.valid_json_rate == 0.0
    assert base.request_count == 1 and base.answers_checked == 0 and base.valid_json_rate is None
    assert base.active_span_s is None and base.active_requests_per_s is None  # one request has no span


def test_answers_without_a_schema_report_json_rates_only():
    assert check_answer(GOOD) == check_answer('```json\n' + GOOD + '\n```')  # a code fence is tolerated
    strict = check_answer(PROSE)
    assert (strict.valid_json, strict.json_found, strict.schema_valid) == (False, True, None)
    assert check_answer("[1, 2]").json_found is False  # a JSON array is no answer object
    schema = OutputSchema(SCHEMA)
    missing = check_answer('{"category": "billing", "priority": "low", "product": "hub"}', schema)
    assert (missing.valid_json, missing.schema_valid) == (True, False)  # summary is required
    # the task's JSON-schema validator judges types, lengths and extra keys too
    for answer in ('{"category": "billing", "priority": "low", "product": "hub", "summary": "Short"}',
                   '{"category": "billing", "priority": 3, "product": "hub", "summary": "Refund the double charge"}',
                   GOOD[:-1] + ', "mood": "angry"}'):
        assert (check_answer(answer, schema).valid_json, check_answer(answer, schema).schema_valid) == (True, False)
    assert check_answer(GOOD, schema).schema_valid is True
    report = serving_report(frame(records()), START, END, schema=None)
    assert report.overall.valid_json_rate == pytest.approx(0.5) and report.overall.schema_valid_rate is None


def test_an_empty_window_is_a_result_without_rates():
    report = serving_report(frame(records()), START + timedelta(days=3), END + timedelta(days=3))
    o = report.overall
    assert (o.request_count, o.error_count, o.requests_per_s, o.completion_tokens_total) == (0, 0, 0.0, 0)
    assert o.error_rate is None and o.latency_p95_s is None and o.valid_json_rate is None
    assert report.groups == ()
    empty = serving_report(frame([]), START, END)
    assert empty.overall.request_count == 0 and len(empty.rows(DAY)) == 1
    assert len(empty.rows(DAY)[0]) == len(SERVING_COLUMNS)


def test_a_window_in_progress_counts_throughput_up_to_now():
    report = serving_report(frame(records()), START, END, now=START + timedelta(hours=1))
    assert report.overall.window_s == 3_600.0
    assert report.overall.requests_per_s == pytest.approx(8 / 3_600)


def test_bad_rows_are_named():
    df = frame(records()).drop(columns=["status"])
    with pytest.raises(ValueError, match=r"lack column\(s\) \['status'\]"):
        serving_report(df, START, END)
    df = frame(records())
    df.loc[2, "record_json"] = "{torn"  # row 2 is a2 (row 0 is the reload)
    with pytest.raises(ValueError, match=r"request a2 .*record_json is not JSON"):
        serving_report(df, START, END)


# -- the daily assets --------------------------------------------------------------------------------


TASK = TaskRef("support_triage", str(ROOT / "tasks"))
DAILY = daily_partitions("2026-01-01")
MONITORING = monitoring_schema(TASK.name)
(serving_metrics,) = build_serving_monitoring_assets(TASK, DAILY)
resource_usage = build_resource_usage(DAILY)


def _resources(tmp_path: Path) -> dict:
    warehouse = DuckDBWarehouse(path=str(tmp_path / "w.duckdb"))
    return {
        "warehouse": warehouse,
        "feedback_store": DuckDBFeedbackStore(warehouse=warehouse),
        "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                 artifact_root=(tmp_path / "artifacts").as_uri()),
        "home": GenopsHome(root=str(tmp_path / "home")),
    }


def _metadata(result, key: str) -> dict:
    mats = result.asset_materializations_for_node(TASK.step(key))
    assert len(mats) == 1
    return {k: v.value for k, v in mats[0].metadata.items()}


def test_serving_metrics_materializes_a_day_into_duckdb_and_mlflow(tmp_path):
    res = _resources(tmp_path)
    recs = records()
    res["warehouse"].append_feedback("requests.jsonl", Chunk([to_row(r, "requests.jsonl", i * 100)
                                                              for i, r in enumerate(recs)], 0, 1, False, []), COLUMNS)

    result = dg.materialize([serving_metrics], partition_key=DAY, resources=res)
    assert result.success
    meta = _metadata(result, "serving_metrics")
    assert meta["request_count"] == 8.0 and meta["error_rate"] == pytest.approx(0.375)
    assert meta["latency_p95_s"] == pytest.approx(0.88) and meta["valid_json_rate"] == pytest.approx(0.5)
    for plot in ("latency_plot", "errors_plot", "tokens_plot"):
        assert meta[plot].startswith("![") and "data:image/png;base64," in meta[plot]
    assert "| **overall** |" in meta["metrics"] and "| champion | 3 | 1 | 5 |" in meta["metrics"]

    wh = res["warehouse"]
    rows = wh.query_df(f"select * from {MONITORING}.serving_metrics order by scope, served_by")
    assert list(rows["scope"]) == ["overall", "version", "version", "version"]
    assert list(rows["partition_key"]) == [DAY] * 4
    overall = rows.iloc[0]
    assert overall["request_count"] == 8 and overall["latency_p99_s"] == pytest.approx(0.976)
    assert json.loads(overall["errors_by_class"]) == {"cancelled": 1, "server": 1, "timeout": 1}
    assert overall["window_start"] == pd.Timestamp("2026-03-02 00:00:00")

    client = res["mlflow"].client()
    run = client.get_run(meta["mlflow_run_id"])
    assert run.data.metrics["latency_p95_s"] == pytest.approx(0.88)
    assert run.data.metrics["champion.adapter_3.prompt_1.error_rate"] == pytest.approx(0.4)
    files = {f.path for f in client.list_artifacts(run.info.run_id, "serving_metrics")}
    assert files == {f"serving_metrics/{n}" for n in ("latency.png", "errors.png", "tokens.png", "summary.json")}
    summary = json.loads(Path(client.download_artifacts(run.info.run_id, "serving_metrics/summary.json",
                                                        str(tmp_path / "dl"))).read_text())
    assert summary["overall"]["request_count"] == 8 and len(summary["groups"]) == 3

    # Again, with one more request of the day: the partition's rows are replaced, the day's run reused
    more = _rec("a6", 3000, "champion", "3", 429, error="rate limited")
    wh.append_feedback("requests.jsonl", Chunk([to_row(more, "requests.jsonl", 5000)], 1, 2, False, []), COLUMNS)
    again = dg.materialize([serving_metrics], partition_key=DAY, resources=res)
    meta2 = _metadata(again, "serving_metrics")
    assert meta2["request_count"] == 9.0 and meta2["mlflow_run_id"] == meta["mlflow_run_id"]
    counts = wh.query_df(f"select scope, count(*) n, max(request_count) m from {MONITORING}.serving_metrics "
                         "group by scope order by scope")
    assert counts.to_dict("records") == [{"scope": "overall", "n": 1, "m": 9}, {"scope": "version", "n": 3, "m": 6}]


def test_serving_metrics_of_a_day_without_requests(tmp_path):
    res = _resources(tmp_path)
    res["warehouse"].append_feedback("requests.jsonl", Chunk([to_row(r, "requests.jsonl", i) for i, r in
                                                              enumerate(records())], 0, 1, False, []), COLUMNS)
    result = dg.materialize([serving_metrics], partition_key="2026-02-01", resources=res)
    assert result.success
    meta = _metadata(result, "serving_metrics")
    assert meta["request_count"] == 0.0 and meta["versions"] == 0
    assert "error_rate" not in meta and not any(k.endswith("_plot") for k in meta)
    rows = res["warehouse"].query_df(f"select * from {MONITORING}.serving_metrics")
    assert len(rows) == 1 and rows.iloc[0]["request_count"] == 0 and pd.isna(rows.iloc[0]["error_rate"])


def test_serving_metrics_without_a_feedback_store_says_what_to_run(tmp_path):
    res = _resources(tmp_path)
    res["warehouse"].execute("create schema if not exists feedback")
    with pytest.raises(RuntimeError, match="materialize request_log first"):
        dg.materialize([serving_metrics], partition_key=DAY, resources=res)


def test_resource_usage_summarises_the_days_samples(tmp_path):
    res = _resources(tmp_path)
    log = Path(res["home"].root) / "endpoint" / "resources.jsonl"
    log.parent.mkdir(parents=True)

    def sample(t: float, cpu: float, rss: int, gpu: int | None = None) -> str:
        return json.dumps({"ts": T0 + t, "pid": 7, "cpu_percent": cpu, "rss_bytes": rss, "num_threads": 9,
                           "gpu_mem_bytes": gpu, "gpu_mem_reserved_bytes": None}) + "\n"

    log.write_text(sample(-5, 99.0, 9_000) + sample(10, 10.0, 1_000) + "{broken\n" + sample(20, 30.0, 3_000)
                   + sample(30, 20.0, 2_000) + sample(40, 40.0, 4_000) + sample(86_401, 99.0, 9_000)
                   + '{"ts": 1')
    result = dg.materialize([resource_usage], partition_key=DAY, resources=res)
    meta = _metadata(result, "resource_usage")
    assert meta["sample_count"] == 4.0 and meta["malformed_lines"] == 1
    # CPU 10 20 30 40: p95 at h = 3 * 0.95 = 2.85 -> 30 + 0.85 * 10; RSS 1000..4000 likewise
    assert meta["cpu_percent_p95"] == pytest.approx(38.5) and meta["cpu_percent_max"] == 40.0
    assert meta["cpu_percent_mean"] == pytest.approx(25.0)  # 100 / 4
    assert meta["rss_bytes_p95"] == pytest.approx(3_850.0) and meta["rss_bytes_max"] == 4_000.0
    assert meta["rss_bytes_last"] == 4_000.0 and "gpu_mem_bytes_max" not in meta
    assert meta["resources_plot"].startswith("![resources](data:image/png;base64,")
    row = res["warehouse"].query_df("select * from monitoring.resource_usage").iloc[0]
    assert row["sample_count"] == 4 and json.loads(row["pids"]) == [7]

    empty = dg.materialize([resource_usage], partition_key="2026-02-01", resources=res)
    meta = _metadata(empty, "resource_usage")
    assert meta["sample_count"] == 0.0 and "resources_plot" not in meta
    assert len(res["warehouse"].query_df("select * from monitoring.resource_usage")) == 2


def test_resource_summary_of_no_samples():
    df, bad = read_resource_samples(Path("/nonexistent/resources.jsonl"), START, END)
    assert len(df) == 0 and bad == []
    s = summarize_resources(df)
    assert s["sample_count"] == 0 and s["rss_bytes_max"] is None and s["cpu_percent_p95"] is None


# -- the sampler -------------------------------------------------------------------------------------


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _wait_for(path: Path, n: int, timeout_s: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while len(_lines(path)) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return _lines(path)


def test_sampler_thread_appends_samples_until_stopped(tmp_path):
    path = tmp_path / "state" / "resources.jsonl"
    sampler = ResourceSampler(path, interval_s=0.05).start()
    try:
        rows = _wait_for(path, 2)
    finally:
        sampler.stop()
    assert not sampler.running
    assert len(rows) >= 2
    for row in rows:
        assert row["pid"] == os.getpid() and row["rss_bytes"] > 0 and row["num_threads"] >= 2
        assert row["cpu_percent"] >= 0 and abs(row["ts"] - time.time()) < 60
        assert "gpu_mem_bytes" in row and "gpu_mem_reserved_bytes" in row
    n = len(_lines(path))
    time.sleep(0.2)
    assert len(_lines(path)) == n  # stopped: nothing more is written


def test_sampler_runs_for_the_life_of_the_app(tmp_path, monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    monkeypatch.setenv("GENOPS_RESOURCE_SAMPLE_S", "0.05")
    app = FastAPI(lifespan=sampler_lifespan(tmp_path))
    with TestClient(app):
        assert app.state.resource_sampler.running
        rows = _wait_for(tmp_path / "resources.jsonl", 2)
    assert len(rows) >= 2 and not app.state.resource_sampler.running

    monkeypatch.setenv("GENOPS_RESOURCE_SAMPLE_S", "0")
    off = FastAPI(lifespan=sampler_lifespan(tmp_path / "off"))
    with TestClient(off):
        assert off.state.resource_sampler is None


def test_sample_interval_setting():
    assert interval_from_env({}) == 5.0 and interval_from_env({"GENOPS_RESOURCE_SAMPLE_S": "0.5"}) == 0.5
    for bad in ("soon", "-1"):
        with pytest.raises(ValueError, match="GENOPS_RESOURCE_SAMPLE_S"):
            interval_from_env({"GENOPS_RESOURCE_SAMPLE_S": bad})
    with pytest.raises(ValueError, match="positive"):
        ResourceSampler(Path("x"), interval_s=0)


def test_the_endpoint_samples_its_own_process(tmp_path, tiny_model_dir):
    from graph_support import free_port

    from genops_assets.serving import control

    state_dir = tmp_path / "endpoint"
    state = control.start_server(str(tiny_model_dir), {}, {}, state_dir, port=free_port(), ready_timeout_s=180,
                                 env={"GENOPS_RESOURCE_SAMPLE_S": "0.1"})
    try:
        rows = _wait_for(state_dir / "resources.jsonl", 2)
    finally:
        control.stop_server(state_dir)
    assert len(rows) >= 2
    assert {r["pid"] for r in rows} == {state.pid} and all(r["rss_bytes"] > 0 for r in rows)
