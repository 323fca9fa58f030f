"""Online quality: a day's live answers judged pointwise and compared with the offline evaluation
of the same adapter version."""

import json
from datetime import datetime, timezone

import dagster as dg
from pydantic import Field

from genops_assets.defs.monitoring.automation import eager_with_follow_up
from genops_assets.defs.monitoring.common import (
    MONITORING_SCHEMA,
    daily,
    monitoring_experiment,
    naive_utc,
    png_md,
    run_in_background,
    utc_day,
)
from genops_assets.lib.cache import CallCache
from resources.judge import JudgeResource
from resources.paths import GenopsHome
from resources.task import TaskResource
from resources.tracking import MlflowTracking
from resources.warehouse import FEEDBACK_SCHEMA, DuckDBWarehouse

ROWS_TABLE = "online_quality"
SUMMARY_TABLE = "online_quality_summary"

ROW_COLUMNS = (
    ("partition_key", "varchar"), ("side", "varchar"), ("version", "varchar"), ("item_id", "varchar"),
    ("ts", "timestamp"), ("served_by", "varchar"), ("prompt_version", "varchar"), ("rubric", "varchar"),
    ("rubric_version", "varchar"), ("judge_model", "varchar"), ("score", "double"), ("choice", "varchar"),
    ("error", "varchar"), ("cached", "boolean"), ("judged_at", "timestamp"),
)
SUMMARY_COLUMNS = (
    ("partition_key", "varchar"), ("version", "varchar"), ("rubric", "varchar"), ("rubric_version", "varchar"),
    ("live_n", "integer"), ("live_failures", "integer"), ("live_mean", "double"), ("live_low", "double"),
    ("live_high", "double"), ("offline_n", "integer"), ("offline_failures", "integer"), ("offline_mean", "double"),
    ("offline_low", "double"), ("offline_high", "double"), ("delta", "double"), ("ci_low", "double"),
    ("ci_high", "double"), ("margin", "double"), ("decided", "boolean"), ("regression", "boolean"),
    ("improvement", "boolean"), ("reason", "varchar"), ("judged_at", "timestamp"),
)


class OnlineQualityConfig(dg.Config):
    share: float = Field(0.2, description="Share of the day's successful answers judged (chosen by a hash of the "
                                          "request id, so a re-run judges the same ones).")
    max_samples: int = Field(50, description="At most this many live answers judged per adapter version and day.")
    offline_max_examples: int | None = Field(100, description="At most this many golden-set answers of the version "
                                             "judged (a fixed hash-chosen subset; None: all).")
    rubric: str = Field("helpfulness", description="Pointwise rubric (built-in or the task's), the same for live "
                                                   "and offline answers. Shown without a reference on both sides.")
    margin: float = Field(0.0, description="A regression is flagged when the 95% interval of live minus offline "
                                           "lies wholly below -margin (an improvement: above +margin).")
    min_samples: int = Field(10, description="Fewer judged answers than this on either side: no decision.")
    seed: int = Field(0, description="Seed of the bootstrap intervals.")


def _live_answers(warehouse: DuckDBWarehouse, start: datetime, end: datetime):
    """The day's successful answers with what was asked and what was answered."""
    if not warehouse.table_exists(FEEDBACK_SCHEMA, "requests"):
        return []
    df = warehouse.query_df(
        f"""select request_id, ts, adapter_version, prompt_version, input_text, response_text, record_json
            from {FEEDBACK_SCHEMA}.requests
            where coalesce(event, 'request') = 'request' and status = 200 and ts >= ? and ts < ?
              and request_id is not null and input_text is not null and response_text is not null
            order by ts, request_id""", [start, end])
    seen, rows = set(), []
    for r in df.itertuples(index=False):
        if r.request_id in seen:
            continue
        seen.add(r.request_id)
        try:
            served_by = json.loads(r.record_json).get("served_by") if r.record_json else None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{FEEDBACK_SCHEMA}.requests, request_id {r.request_id}: record_json is not JSON: "
                             f"{exc}") from exc
        rows.append({"request_id": str(r.request_id), "ts": r.ts.to_pydatetime() if r.ts is not None else None,
                     "version": None if r.adapter_version is None else str(r.adapter_version),
                     "prompt_version": r.prompt_version, "served_by": served_by,
                     "input_text": r.input_text, "response_text": r.response_text})
    return rows


def _offline_labels(eval_report: dict) -> dict[str, str]:
    """Model labels of eval_report's predictions file -> adapter version they evaluated."""
    labels = {f"candidate v{eval_report['candidate']['version']}": str(eval_report["candidate"]["version"])}
    if eval_report.get("champion"):
        v = str(eval_report["champion"]["version"])
        labels[f"champion v{v}"] = v
    return labels


def _replace_partition(warehouse: DuckDBWarehouse, partition_key: str, rows: list[tuple],
                       summaries: list[tuple]) -> None:
    """The partition's judged rows and its summaries, both tables replaced in one transaction."""
    warehouse.replace_partitions(MONITORING_SCHEMA, "partition_key", partition_key, {
        ROWS_TABLE: (ROW_COLUMNS, rows), SUMMARY_TABLE: (SUMMARY_COLUMNS, summaries)})


@dg.asset(group_name="monitoring", kinds={"duckdb", "mlflow"}, partitions_def=daily,
          deps=[dg.AssetKey("request_log")],
          # New live answers start a refresh; a new evaluation alone does not (it is read when
          # the next answers arrive).
          automation_condition=eager_with_follow_up().ignore(
              dg.AssetSelection.assets("eval_report", "base_model")))
def online_quality(
    context: dg.AssetExecutionContext,
    config: OnlineQualityConfig,
    eval_report: dict,
    base_model: dict,
    task: TaskResource,
    warehouse: DuckDBWarehouse,
    judge: JudgeResource,
    mlflow: MlflowTracking,
    home: GenopsHome,
) -> dg.MaterializeResult:
    """One UTC day of live quality: a hash-chosen share of the day's successful answers of each
    adapter version that eval_report evaluated, judged pointwise with one rubric, against the same
    judge on that version's golden-set answers; means, live-minus-offline difference with a 95%
    bootstrap interval, and a regression / improvement decision. Rows (one per judged answer) and
    a summary per version go to `monitoring.online_quality` / `monitoring.online_quality_summary`,
    the partition replaced atomically. Metadata `regression` (bool) and `version` (str) are read
    by the rollback sensor. Judge calls are cached by content, so the offline side and re-runs
    cost nothing twice. Cost: about one judge call per sampled answer."""
    run_in_background(context, home.background_nice)
    from genops_assets.lib.hashing import atomic_dir
    from genops_assets.lib.judging import BUILTIN_RUBRICS, load_rubrics
    from genops_assets.lib.online_quality import (
        ScoreItem,
        compare,
        comparison_chart_png,
        load_offline_predictions,
        sample_rows,
        score_pointwise,
        scores_of,
    )

    spec = task.load()
    rubrics = load_rubrics(BUILTIN_RUBRICS, spec.root / "rubrics")
    if config.rubric not in rubrics:
        raise ValueError(f"unknown rubric '{config.rubric}'; available: {sorted(rubrics)} "
                         f"(built-in {BUILTIN_RUBRICS}, task {spec.root / 'rubrics'})")
    rubric = rubrics[config.rubric]
    if rubric.kind != "pointwise":
        raise ValueError(f"rubric '{rubric.name}' ({rubric.source}) is {rubric.kind}; online quality needs a "
                         "pointwise rubric")
    partition = context.partition_key
    start, end = (naive_utc(t) for t in utc_day(context))

    live = _live_answers(warehouse, start, end)
    offline_all = load_offline_predictions(eval_report["predictions_file"], _offline_labels(eval_report))
    live_versions = sorted({r["version"] for r in live if r["version"] is not None})
    versions = [v for v in live_versions if v in offline_all]
    base_meta = {"partition": partition, "rubric": f"{rubric.name}@{rubric.version}",
                 "live_answers": len(live), "live_versions": ", ".join(live_versions) or "none",
                 "offline_versions": ", ".join(sorted(offline_all)) or "none"}
    if not versions:
        why = ("no successful live answers with an input and a response" if not live else
               f"no live answers from a version with offline predictions (live: {live_versions or 'no adapter'}, "
               f"offline: {sorted(offline_all)})")
        context.log.info(f"online quality {partition}: {why}; nothing compared")
        _replace_partition(warehouse, partition, [], [])
        return dg.MaterializeResult(metadata={
            **base_meta, "compared": False, "reason": why, "version": "", "regression": False,
            "improvement": False, "live_n": 0, "offline_n": 0})

    cache = CallCache(home.cache_dir / "calls.sqlite")
    client = judge.connect(base_model.get("path"), cache=cache)

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 5) == 0:
            context.log.info(f"judging: {done}/{total} calls")

    judged_at = datetime.now(timezone.utc).replace(tzinfo=None)
    common = (rubric.name, rubric.version, client.model)
    rows: list[tuple] = []
    summaries: list[tuple] = []
    comparisons = {}
    failures_by_version = {}
    for v in versions:
        sampled = sample_rows([r for r in live if r["version"] == v], lambda r: r["request_id"], config.share,
                              config.max_samples)
        offline_items = sample_rows(offline_all[v], lambda it: it.item_id, 1.0, config.offline_max_examples)
        context.log.info(f"version {v}: {len(sampled)} live answers sampled, {len(offline_items)} golden answers; "
                         f"judge {client.model} at {client.base_url}, rubric {rubric.name}@{rubric.version}")
        live_scored = score_pointwise(client, rubric, [ScoreItem(r["request_id"], r["input_text"], r["response_text"])
                                                       for r in sampled], on_done=progress)
        offline_scored = score_pointwise(client, rubric, offline_items, on_done=progress)
        for r, s in zip(sampled, live_scored, strict=True):
            rows.append((partition, "live", v, s.item_id, r["ts"], r["served_by"], r["prompt_version"], *common,
                         s.score, s.choice, s.error, s.cached, judged_at))
        for s in offline_scored:
            rows.append((partition, "offline", v, s.item_id, None, None, None, *common, s.score, s.choice, s.error,
                         s.cached, judged_at))
        c = compare(scores_of(live_scored), scores_of(offline_scored), config.margin, config.min_samples,
                    seed=config.seed)
        comparisons[v] = c
        lf = sum(s.error is not None for s in live_scored)
        of = sum(s.error is not None for s in offline_scored)
        failures_by_version[v] = {"live": lf, "offline": of,
                                  "first_errors": [s.error for s in [*live_scored, *offline_scored] if s.error][:5]}

        def part(iv):
            return (None, None, None) if iv is None else (iv.estimate, iv.low, iv.high)

        summaries.append((partition, v, rubric.name, rubric.version, c.live_n, lf, *part(c.live), c.offline_n, of,
                          *part(c.offline), *part(c.delta), c.margin, c.decided, c.regression, c.improvement,
                          c.reason, judged_at))
        context.log.info(f"version {v}: {c.reason}")

    _replace_partition(warehouse, partition, rows, summaries)
    usage = client.usage.as_dict(judge.price_in_per_1k, judge.price_out_per_1k)

    # The headline comparison the sensor acts on: a regressed version (the worst) if any, else
    # the version with the most live answers judged.
    regressed = [v for v in versions if comparisons[v].regression]
    if regressed:
        head = min(regressed, key=lambda v: comparisons[v].delta.high)
    else:
        head = max(versions, key=lambda v: (comparisons[v].live_n, v))
    hc = comparisons[head]

    chart = comparison_chart_png(comparisons, rubric.name, float(max(int(c) for c in rubric.choices)))
    run_id = mlflow.start_run(monitoring_experiment(spec.name), f"online-quality-{partition}",
                              tags={"genops.dagster_run_id": context.run.run_id, "genops.kind": "online_quality",
                                    "genops.partition": partition, "genops.version": head})
    out_dir = home.runs_dir / "online_quality" / partition
    with atomic_dir(out_dir) as tmp:
        (tmp / "online_quality.png").write_bytes(chart)
        (tmp / "summary.json").write_text(json.dumps(
            {**base_meta, "versions": {v: {**comparisons[v].as_dict(), "failures": failures_by_version[v]}
                                       for v in versions}, "judge_usage": usage}, indent=2, default=str))
        with open(tmp / "rows.jsonl", "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(dict(zip((n for n, _ in ROW_COLUMNS), r, strict=True)), default=str) + "\n")
    mlflow.log_params(run_id, {"rubric": f"{rubric.name}@{rubric.version}", "judge_model": client.model,
                               "judge_url": client.base_url, "share": config.share,
                               "max_samples": config.max_samples, "offline_max_examples": config.offline_max_examples,
                               "margin": config.margin, "min_samples": config.min_samples,
                               "eval_run_id": eval_report.get("mlflow_run_id", "")})
    metrics = {f"judge_{k}": float(val) for k, val in usage.items()}
    for v, c in comparisons.items():
        metrics.update({f"v{v}.live_n": c.live_n, f"v{v}.offline_n": c.offline_n,
                        f"v{v}.regression": float(c.regression), f"v{v}.improvement": float(c.improvement)})
        for side in ("live", "offline", "delta"):
            iv = getattr(c, side)
            if iv is not None:
                metrics.update({f"v{v}.{side}_mean" if side != "delta" else f"v{v}.delta": iv.estimate,
                                f"v{v}.{side}_low": iv.low, f"v{v}.{side}_high": iv.high})
    mlflow.log_metrics(run_id, metrics)
    mlflow.log_artifacts(run_id, out_dir, "online_quality")
    mlflow.end_run(run_id)

    def num(iv, attr):
        return None if iv is None else float(getattr(iv, attr))

    return dg.MaterializeResult(metadata={
        **base_meta,
        "compared": True,
        "version": str(head),
        "regression": bool(hc.regression),
        "improvement": bool(hc.improvement),
        "decided": bool(hc.decided),
        "reason": hc.reason,
        "live_n": hc.live_n,
        "live_mean": num(hc.live, "estimate"),
        "offline_n": hc.offline_n,
        "offline_mean": num(hc.offline, "estimate"),
        "delta": num(hc.delta, "estimate"),
        "ci_low": num(hc.delta, "low"),
        "ci_high": num(hc.delta, "high"),
        "margin": float(config.margin),
        "live_failures": failures_by_version[head]["live"],
        "offline_failures": failures_by_version[head]["offline"],
        "comparisons": dg.MetadataValue.json({v: {**comparisons[v].as_dict(), "failures": failures_by_version[v]}
                                              for v in versions}),
        "judge_calls": int(usage["calls"]),
        "judge_cached": int(usage["cached"]),
        "judge_failures": int(usage["failures"]),
        "judge_prompt_tokens": int(usage["prompt_tokens"]),
        "judge_completion_tokens": int(usage["completion_tokens"]),
        "judge_usage": dg.MetadataValue.json(usage),
        "mlflow_run_id": run_id,
        "table": f"{MONITORING_SCHEMA}.{ROWS_TABLE}",
        "chart": png_md("online quality", chart),
    })
