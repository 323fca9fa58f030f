"""Serving metrics over a window of request records, and summaries of the server's resource samples.

Input: rows of the feedback store (``feedback.requests``), one per request record the endpoint
wrote. Only ``event == 'request'`` rows are requests; ``reload`` rows are counted apart. Rows are
grouped by the adapter that answered (``served_by`` in the stored record; the requested ``model``
when the record has none), its version and the prompt version, and summarised once more overall.

Definitions (every statistic below is over the group's request rows in the window):

- ``request_count``: rows; ``ok_count``: rows with status 200; every other row is an error, its
  class from ``protection.error_class(status)`` (a row without a status: class ``unknown``).
  ``error_rate = error_count / request_count``.
- Throughput: ``requests_per_s = request_count / window_s`` and ``output_tokens_per_s =
  completion_tokens_total / window_s``, where ``window_s`` is the window's length (for a window
  still in progress, up to ``now``). ``active_*`` use the span from the first to the last request
  instead (None with fewer than two requests or a zero span).
- Latency and queue time: of answered (status 200) requests only; a failed request's latency is
  the time to its timeout or disconnect, which says nothing about serving speed.
  Percentiles are ``stats.percentile``: numpy's ``method="linear"`` (Hyndman & Fan type 7), the
  definition the offline evaluation and the benchmarks use too: for the n sorted values
  x[0..n-1], percentile p sits at position h = (n - 1) * p / 100 and is
  x[floor(h)] + (h - floor(h)) * (x[floor(h) + 1] - x[floor(h)]).
- Tokens: totals over all request rows (a failed request still spent the tokens it processed);
  means over answered requests.
- Task health, over live answers (status 200, a response recorded, not a ``guided_choice``
  request, whose answer is one of the given strings by construction): ``valid_json_rate`` and
  ``json_found_rate`` use the offline evaluation's parser (``formatting.parse_prediction``) strict
  and lenient, so they compare with the evaluation's metrics of the same names. With the task's
  output schema, ``schema_valid_rate`` (strict) and ``schema_valid_lenient_rate`` also need the
  extracted object to pass the task's JSON-schema validator (required fields, types, allowed
  labels, lengths, extra keys), the one that checks label files and marts; a null field counts
  as absent.

A statistic over zero values is None, never 0: an empty window has ``request_count`` 0 and no
rates.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from genops_assets.lib.formatting import parse_prediction
from genops_assets.lib.output_schema import OutputSchema
from genops_assets.lib.stats import PERCENTILE_METHOD, finite_values, percentile
from genops_assets.serving.protection import error_class

REQUIRED_COLUMNS = ("ts", "event", "model", "adapter_version", "prompt_version", "status", "latency_s",
                    "queue_s", "prompt_tokens", "completion_tokens", "response_text", "record_json")
UNKNOWN_CLASS = "unknown"
NONE_LABEL = "none"


# -- statistics ------------------------------------------------------------------------------------


def _mean(values: Any) -> float | None:
    arr = finite_values(values)
    return float(arr.mean()) if arr.size else None


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


# -- answers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerCheck:
    valid_json: bool
    json_found: bool
    schema_valid: bool | None
    schema_valid_lenient: bool | None


def answer_object(parsed: Mapping[str, Any]) -> dict[str, Any]:
    """The answer object as the extraction saw it: its fields with a value, and its other keys
    (their values are not kept; a schema that allows them sets no rule on them)."""
    extra = {k: None for k in parsed.get("_extra_keys", ())}
    return extra | {k: v for k, v in parsed.items() if k != "_extra_keys" and v is not None}


def check_answer(text: str, schema: OutputSchema | None = None) -> AnswerCheck:
    """Strict and lenient JSON extraction of one answer and, with a schema, whether it conforms."""
    names = schema.fields if schema else ()
    strict = parse_prediction(text, names)
    lenient = strict if strict is not None else parse_prediction(text, names, lenient=True)
    if schema is None:
        return AnswerCheck(strict is not None, lenient is not None, None, None)
    return AnswerCheck(strict is not None, lenient is not None,
                       strict is not None and schema.is_valid(answer_object(strict)),
                       lenient is not None and schema.is_valid(answer_object(lenient)))


# -- request windows -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupStats:
    """Serving statistics of one group of requests (see the module docstring for definitions)."""

    scope: str  # "overall" or "version"
    served_by: str | None
    adapter_version: str | None
    prompt_version: str | None
    request_count: int
    ok_count: int
    error_count: int
    error_rate: float | None
    errors_by_class: dict[str, int]
    window_s: float
    requests_per_s: float
    output_tokens_per_s: float
    active_span_s: float | None
    active_requests_per_s: float | None
    active_output_tokens_per_s: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_p99_s: float | None
    latency_mean_s: float | None
    queue_p50_s: float | None
    queue_p95_s: float | None
    prompt_tokens_total: int
    completion_tokens_total: int
    prompt_tokens_mean: float | None
    completion_tokens_mean: float | None
    answers_checked: int
    valid_json_rate: float | None
    json_found_rate: float | None
    schema_valid_rate: float | None
    schema_valid_lenient_rate: float | None

    @property
    def label(self) -> str:
        if self.scope == "overall":
            return "overall"
        return f"{self.served_by} (adapter {self.adapter_version}, prompt {self.prompt_version})"


# DuckDB type of each GroupStats annotation (errors_by_class is stored as JSON text).
_DUCKDB_TYPES = {"str": "varchar", "str | None": "varchar", "int": "bigint", "float": "double",
                 "float | None": "double", "dict[str, int]": "varchar"}
# The warehouse table's columns: the partition and its window, then GroupStats in order.
SERVING_COLUMNS: tuple[tuple[str, str], ...] = (
    ("partition_key", "varchar"), ("window_start", "timestamp"), ("window_end", "timestamp"),
    *((f.name, _DUCKDB_TYPES[str(f.type)]) for f in fields(GroupStats)),
)


@dataclass(frozen=True)
class ServingReport:
    window_start: datetime
    window_end: datetime
    overall: GroupStats
    groups: tuple[GroupStats, ...]
    reloads: int

    def rows(self, partition_key: str) -> list[tuple]:
        """Rows of SERVING_COLUMNS: the overall row first (timestamps UTC, naive)."""
        start, end = _naive_utc(self.window_start), _naive_utc(self.window_end)
        out = []
        for g in (self.overall, *self.groups):
            values = asdict(g)
            values["errors_by_class"] = json.dumps(values["errors_by_class"], sort_keys=True)
            out.append((partition_key, start, end, *values.values()))
        return out

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the window, the overall statistics, each group's, the reload count."""
        return {"window_start": self.window_start.isoformat(), "window_end": self.window_end.isoformat(),
                "percentile_method": PERCENTILE_METHOD, "reloads": self.reloads,
                "overall": asdict(self.overall), "groups": [asdict(g) for g in self.groups]}


def _naive_utc(when: datetime) -> datetime:
    return when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo else when


def _epoch(when: datetime) -> float:
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _record_fields(raw: Any, where: str) -> tuple[str | None, bool]:
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return None, False
    try:
        record = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: record_json is not JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise ValueError(f"{where}: record_json is not a JSON object")
    served = record.get("served_by")
    return (None if served is None else str(served)), bool(record.get("guided"))


def prepare_requests(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """(request rows with the group keys, ``ok`` and ``error_class`` columns; reload row count)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"request rows lack column(s) {missing} (have {list(df.columns)})")
    events = df["event"].fillna("request")
    reloads = int((events == "reload").sum())
    rows = df[events == "request"].copy()
    ids = rows["request_id"] if "request_id" in rows.columns else rows.index
    where = [f"request {rid} (row {i})" for i, rid in zip(rows.index, ids, strict=True)]
    parsed = [_record_fields(raw, w) for raw, w in zip(rows["record_json"], where, strict=True)]
    served = [s for s, _ in parsed]
    rows["guided"] = [g for _, g in parsed]
    rows["served_by"] = [s if s is not None else m for s, m in zip(served, rows["model"], strict=True)]
    for col in ("served_by", "adapter_version", "prompt_version"):
        rows[col] = [NONE_LABEL if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                     for v in rows[col]]
    status = pd.to_numeric(rows["status"], errors="coerce")
    rows["ok"] = status == 200
    rows["error_class"] = [None if ok else (UNKNOWN_CLASS if math.isnan(s) else error_class(int(s)))
                           for ok, s in zip(rows["ok"], status, strict=True)]
    rows["ts"] = pd.to_datetime(rows["ts"])
    return rows, reloads


def _group_stats(rows: pd.DataFrame, scope: str, key: tuple[str | None, str | None, str | None], window_s: float,
                 schema: OutputSchema | None) -> GroupStats:
    n = len(rows)
    ok = rows[rows["ok"]]
    errors = rows["error_class"].dropna().value_counts()
    completion_total = int(finite_values(rows["completion_tokens"]).sum())
    prompt_total = int(finite_values(rows["prompt_tokens"]).sum())
    span = None
    if n >= 2:
        span = (rows["ts"].max() - rows["ts"].min()).total_seconds()
    active = span if span else None
    live = ok[ok["response_text"].notna() & ~ok["guided"].astype(bool)]
    checks = [check_answer(str(t), schema) for t in live["response_text"]]
    m = len(checks)

    def rate(attr: str) -> float | None:
        values = [getattr(c, attr) for c in checks]
        if not m or values[0] is None:
            return None
        return sum(values) / m

    return GroupStats(
        scope=scope, served_by=key[0], adapter_version=key[1], prompt_version=key[2],
        request_count=n, ok_count=len(ok), error_count=n - len(ok), error_rate=_ratio(n - len(ok), n),
        errors_by_class={str(k): int(v) for k, v in sorted(errors.items())},
        window_s=float(window_s), requests_per_s=n / window_s, output_tokens_per_s=completion_total / window_s,
        active_span_s=span, active_requests_per_s=_ratio(n, active) if active else None,
        active_output_tokens_per_s=_ratio(completion_total, active) if active else None,
        latency_p50_s=percentile(ok["latency_s"], 50), latency_p95_s=percentile(ok["latency_s"], 95),
        latency_p99_s=percentile(ok["latency_s"], 99), latency_mean_s=_mean(ok["latency_s"]),
        queue_p50_s=percentile(ok["queue_s"], 50), queue_p95_s=percentile(ok["queue_s"], 95),
        prompt_tokens_total=prompt_total, completion_tokens_total=completion_total,
        prompt_tokens_mean=_mean(ok["prompt_tokens"]), completion_tokens_mean=_mean(ok["completion_tokens"]),
        answers_checked=m, valid_json_rate=rate("valid_json"), json_found_rate=rate("json_found"),
        schema_valid_rate=rate("schema_valid"), schema_valid_lenient_rate=rate("schema_valid_lenient"),
    )


def serving_report(df: pd.DataFrame, window_start: datetime, window_end: datetime,
                   schema: OutputSchema | None = None, now: datetime | None = None) -> ServingReport:
    """Statistics of the request rows of ``[window_start, window_end)`` (rows outside are ignored;
    naive timestamps are UTC). A window still in progress (``now`` before its end) counts its
    length up to ``now`` for throughput."""
    start, end = _naive_utc(window_start), _naive_utc(window_end)
    if end <= start:
        raise ValueError(f"window end {window_end} is not after its start {window_start}")
    upto = min(end, _naive_utc(now)) if now is not None else end
    window_s = (upto - start).total_seconds()
    if window_s <= 0:
        raise ValueError(f"window {window_start} .. {window_end} has not started at {now}")
    rows, reloads = prepare_requests(df)
    if len(rows):
        rows = rows[(rows["ts"] >= pd.Timestamp(start)) & (rows["ts"] < pd.Timestamp(end))]
    overall = _group_stats(rows, "overall", (None, None, None), window_s, schema)
    groups = []
    if len(rows):
        keys = ["served_by", "adapter_version", "prompt_version"]
        for key, part in rows.groupby(keys, sort=True):
            groups.append(_group_stats(part, "version", tuple(key), window_s, schema))
    return ServingReport(window_start, window_end, overall, tuple(groups), reloads)


# -- resource samples ------------------------------------------------------------------------------

RESOURCE_FIELDS = ("ts", "pid", "cpu_percent", "rss_bytes", "num_threads", "gpu_mem_bytes",
                   "gpu_mem_reserved_bytes")


def read_resource_samples(path: Path, start: datetime, end: datetime) -> tuple[pd.DataFrame, list[str]]:
    """Samples of ``[start, end)`` from the sampler's JSONL file (empty if the file is absent), and
    the malformed lines skipped, each named by file and line. A torn last line is being written."""
    lo, hi = _epoch(start), _epoch(end)
    samples, malformed = [], []
    if path.exists():
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.endswith("\n"):
                    break
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    ts = float(rec["ts"])
                    rss = int(rec["rss_bytes"])
                except (ValueError, KeyError, TypeError) as exc:
                    malformed.append(f"{path}, line {line_no}: {type(exc).__name__}: {exc}")
                    continue
                if lo <= ts < hi:
                    samples.append({**{k: rec.get(k) for k in RESOURCE_FIELDS}, "ts": ts, "rss_bytes": rss})
    df = pd.DataFrame(samples, columns=list(RESOURCE_FIELDS))
    return df.sort_values("ts", kind="stable").reset_index(drop=True), malformed


def summarize_resources(df: pd.DataFrame) -> dict[str, Any]:
    """Sample count, process ids, CPU percent (mean, p95, max; percent of one core, so above 100
    on several), RSS bytes (mean, p95, max, last), most threads, most GPU memory allocated and
    reserved (None without GPU samples). Percentiles as in ``percentile``."""
    n = len(df)
    cpu, rss = df["cpu_percent"], df["rss_bytes"]
    gpu, reserved = finite_values(df["gpu_mem_bytes"]), finite_values(df["gpu_mem_reserved_bytes"])
    threads = finite_values(df["num_threads"])
    return {
        "sample_count": n,
        "pids": sorted({int(p) for p in df["pid"].dropna()}),
        "first_ts": float(df["ts"].min()) if n else None,
        "last_ts": float(df["ts"].max()) if n else None,
        "cpu_percent_mean": _mean(cpu),
        "cpu_percent_p95": percentile(cpu, 95),
        "cpu_percent_max": float(finite_values(cpu).max()) if finite_values(cpu).size else None,
        "rss_bytes_mean": _mean(rss),
        "rss_bytes_p95": percentile(rss, 95),
        "rss_bytes_max": int(finite_values(rss).max()) if n else None,
        "rss_bytes_last": int(rss.iloc[-1]) if n else None,
        "num_threads_max": int(threads.max()) if threads.size else None,
        "gpu_mem_bytes_max": int(gpu.max()) if gpu.size else None,
        "gpu_mem_reserved_bytes_max": int(reserved.max()) if reserved.size else None,
    }


RESOURCE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("partition_key", "varchar"), ("window_start", "timestamp"), ("window_end", "timestamp"),
    ("sample_count", "bigint"), ("pids", "varchar"), ("first_ts", "double"), ("last_ts", "double"),
    ("cpu_percent_mean", "double"), ("cpu_percent_p95", "double"), ("cpu_percent_max", "double"),
    ("rss_bytes_mean", "double"), ("rss_bytes_p95", "double"), ("rss_bytes_max", "bigint"),
    ("rss_bytes_last", "bigint"), ("num_threads_max", "bigint"), ("gpu_mem_bytes_max", "bigint"),
    ("gpu_mem_reserved_bytes_max", "bigint"),
)


def resource_row(partition_key: str, start: datetime, end: datetime, summary: Mapping[str, Any]) -> tuple:
    values = {**summary, "pids": json.dumps(summary["pids"])}
    return (partition_key, _naive_utc(start), _naive_utc(end), *(values[c] for c, _ in RESOURCE_COLUMNS[3:]))


# -- presentation ----------------------------------------------------------------------------------


def serving_table_md(report: ServingReport) -> str:
    """One Markdown row per group, then the overall row."""
    from genops_assets.lib.report import render

    return render("serving_table.md", groups=[*report.groups, report.overall]).rstrip("\n")


def latency_chart_png(groups: Sequence[GroupStats]) -> bytes:
    """Grouped bars: latency p50 / p95 / p99 of answered requests per served version."""
    from genops_assets.lib.report import _plt, _png

    plt = _plt()
    shown = [g for g in groups if g.latency_p50_s is not None]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(shown) + 2), 3.6), dpi=110)
    width = 0.26
    for i, (attr, name) in enumerate((("latency_p50_s", "p50"), ("latency_p95_s", "p95"),
                                      ("latency_p99_s", "p99"))):
        bars = ax.bar([j + i * width for j in range(len(shown))], [getattr(g, attr) for g in shown], width,
                      label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([j + width for j in range(len(shown))])
    ax.set_xticklabels([g.label for g in shown], rotation=15, fontsize=7)
    ax.set_ylabel("seconds")
    ax.set_title("Latency of answered requests by version")
    ax.legend(fontsize=8)
    return _png(fig)


def error_chart_png(overall: GroupStats) -> bytes:
    """One bar per error class: its share of all requests, labelled with its count."""
    from genops_assets.lib.report import _plt, _png

    plt = _plt()
    classes = sorted(overall.errors_by_class)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(classes) + 2), 3.2), dpi=110)
    rates = [overall.errors_by_class[c] / overall.request_count for c in classes]
    bars = ax.bar(range(len(classes)), rates, color="#c62828")
    ax.bar_label(bars, labels=[str(overall.errors_by_class[c]) for c in classes], fontsize=8)
    ax.set_xticks(range(len(classes)))
    ax.set_xticklabels(classes, fontsize=8, rotation=15)
    ax.set_ylabel("share of requests")
    ax.set_title(f"Errors by class ({overall.error_count} of {overall.request_count} requests)")
    return _png(fig)


def tokens_chart_png(groups: Sequence[GroupStats]) -> bytes:
    """Grouped bars: prompt and completion tokens per served version."""
    from genops_assets.lib.report import _plt, _png

    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups) + 2), 3.6), dpi=110)
    width = 0.4
    for i, (attr, name) in enumerate((("prompt_tokens_total", "prompt tokens"),
                                      ("completion_tokens_total", "completion tokens"))):
        bars = ax.bar([j + i * width for j in range(len(groups))], [getattr(g, attr) for g in groups], width,
                      label=name)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks([j + width / 2 for j in range(len(groups))])
    ax.set_xticklabels([g.label for g in groups], rotation=15, fontsize=7)
    ax.set_ylabel("tokens")
    ax.set_title("Tokens by version")
    ax.legend(fontsize=8)
    return _png(fig)


def resource_chart_png(df: pd.DataFrame) -> bytes:
    """CPU percent and memory (RSS, and GPU memory where sampled) of the server over time (UTC)."""
    from genops_assets.lib.report import _plt, _png

    plt = _plt()
    when = pd.to_datetime(df["ts"], unit="s", utc=True)
    fig, (cpu_ax, mem_ax) = plt.subplots(2, 1, figsize=(7, 4.6), dpi=110, sharex=True)
    cpu_ax.plot(when, pd.to_numeric(df["cpu_percent"], errors="coerce"), color="#1565c0", lw=1)
    cpu_ax.set_ylabel("CPU %")
    cpu_ax.set_title("Endpoint process resources")
    mem_ax.plot(when, pd.to_numeric(df["rss_bytes"], errors="coerce") / 2**20, color="#2e7d32", lw=1, label="RSS")
    gpu = pd.to_numeric(df["gpu_mem_bytes"], errors="coerce")
    if gpu.notna().any():
        mem_ax.plot(when, gpu / 2**20, color="#ef6c00", lw=1, label="GPU allocated")
    mem_ax.set_ylabel("MiB")
    mem_ax.set_xlabel("time (UTC)")
    mem_ax.legend(fontsize=8)
    fig.autofmt_xdate()
    return _png(fig)
