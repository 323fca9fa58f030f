"""Online quality: a day's live answers judged pointwise and compared with the offline evaluation
of the same adapter version."""

import json
from datetime import UTC, datetime

import dagster as dg
from pydantic import Field

from genops_assets.components.binding import bind_task, task_group, task_ins, task_key
from genops_assets.defs.monitoring.automation import eager_with_follow_up
from genops_assets.defs.monitoring.common import (
    monitoring_experiment,
    naive_utc,
    run_in_background,
    utc_day,
)
from genops_assets.lib.cache import CallCache
from genops_assets.lib.online_quality import ROW_COLUMNS, SUMMARY_COLUMNS, LiveAnswer, QualityPlan
from genops_assets.lib.report import png_markdown
from genops_assets.lib.tasks import TaskRef
from resources.feedback_store import FeedbackStore, RequestQuery
from resources.judge import JudgeResource
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking
from resources.warehouse import DuckDBWarehouse, monitoring_schema

ROWS_TABLE = "online_quality"
SUMMARY_TABLE = "online_quality_summary"


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


def _live_answers(feedback_store: FeedbackStore, start: datetime, end: datetime, task: str) -> list[LiveAnswer]:
    """The day's successful answers of ``task`` with what was asked and what was answered."""
    df = feedback_store.requests(RequestQuery(
        ("request_id", "ts", "adapter_version", "prompt_version", "input_text", "response_text", "record_json"),
        task=task, start=start, end=end, requests_only=True, status=200,
        not_null=("request_id", "input_text", "response_text")))
    seen, answers = set(), []
    for request in df.itertuples(index=False):
        if request.request_id in seen:
            continue
        seen.add(request.request_id)
        try:
            served_by = json.loads(request.record_json).get("served_by") if request.record_json else None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{feedback_store.table_ref}, request_id {request.request_id}: record_json is not "
                             f"JSON: {exc}") from exc
        answers.append(LiveAnswer(
            str(request.request_id), request.ts.to_pydatetime() if request.ts is not None else None,
            None if request.adapter_version is None else str(request.adapter_version), request.prompt_version,
            served_by, request.input_text, request.response_text))
    return answers


def _offline_labels(eval_report: dict) -> dict[str, str]:
    """Model labels of eval_report's predictions file -> adapter version they evaluated."""
    labels = {f"candidate v{eval_report['candidate']['version']}": str(eval_report["candidate"]["version"])}
    if eval_report.get("champion"):
        champion = str(eval_report["champion"]["version"])
        labels[f"champion v{champion}"] = champion
    return labels


def _replace_partition(warehouse: DuckDBWarehouse, schema: str, partition_key: str, rows: list[tuple],
                       summaries: list[tuple]) -> None:
    """The partition's judged rows and its summaries, both tables replaced in one transaction."""
    warehouse.replace_partitions(schema, "partition_key", partition_key, {
        ROWS_TABLE: (ROW_COLUMNS, rows), SUMMARY_TABLE: (SUMMARY_COLUMNS, summaries)})


def online_quality(
    context: dg.AssetExecutionContext,
    config: OnlineQualityConfig,
    eval_report: dict,
    base_model: dict,
    judge_certificate: dict,
    task: TaskRef,
    warehouse: DuckDBWarehouse,
    feedback_store: FeedbackStore,
    judge: JudgeResource,
    mlflow: MlflowTracking,
    home: GenopsHome,
) -> dg.MaterializeResult:
    """One UTC day of live quality: a hash-chosen share of the day's successful answers of each
    adapter version that eval_report evaluated, judged pointwise with one rubric, against the same
    judge on that version's golden-set answers; means, live-minus-offline difference with a 95%
    bootstrap interval, and a regression / improvement decision. Rows (one per judged answer) and
    a summary per version go to `monitoring_<task>.online_quality` / `..._summary`,
    the partition replaced atomically. Metadata `regression` (bool), `judge_certified` (bool) and
    `version` (str) are read by the rollback sensor, which acts only on a judge that
    judge_certificate certified; an uncertified judge's scores are shown, marked, and
    decide nothing. Judge calls are cached by content, so the offline side and re-runs
    cost nothing twice. Cost: about one judge call per sampled answer."""
    run_in_background(context, home.background_nice)
    from genops_assets.lib.judge_certificate import judge_trust, trust_tags
    from genops_assets.lib.online_quality import (
        comparison_chart_png,
        headline_metadata,
        headline_version,
        judge_version,
        load_offline_predictions,
        pointwise_rubric,
        quality_metrics,
        result_rows,
        summary_row,
        write_day_files,
    )

    spec = task.load()
    schema = monitoring_schema(spec.name)
    rubric = pointwise_rubric(config.rubric, spec.root / "rubrics")
    partition = context.partition_key
    start, end = (naive_utc(t) for t in utc_day(context))

    live = _live_answers(feedback_store, start, end, spec.name)
    offline = load_offline_predictions(eval_report["predictions_file"], _offline_labels(eval_report))
    live_versions = sorted({a.version for a in live if a.version is not None})
    versions = [v for v in live_versions if v in offline]
    day_meta = {"partition": partition, "rubric": f"{rubric.name}@{rubric.version}",
                "live_answers": len(live), "live_versions": ", ".join(live_versions) or "none",
                "offline_versions": ", ".join(sorted(offline)) or "none"}
    if not versions:
        why = ("no successful live answers with an input and a response" if not live else
               f"no live answers from a version with offline predictions (live: {live_versions or 'no adapter'}, "
               f"offline: {sorted(offline)})")
        context.log.info(f"online quality {partition}: {why}; nothing compared")
        _replace_partition(warehouse, schema, partition, [], [])
        return dg.MaterializeResult(metadata={
            **day_meta, "compared": False, "reason": why, "version": "", "regression": False,
            "improvement": False, "live_n": 0, "offline_n": 0, "judge_certified": False,
            "judge_status": "no judge asked"})

    client = judge.connect(base_model.get("path"), cache=CallCache(home.cache_dir / "calls.sqlite"))
    # The certificate is for the judge (model and endpoint); the pointwise rubric is not itself
    # certified, which the status says.
    certified, trust = judge_trust(judge_certificate, client.model, client.base_url)
    if certified:
        trust += f"; the pointwise rubric {rubric.name}@{rubric.version} is scored by that judge"
    else:
        context.log.warning(f"{trust}: online quality scores are shown, marked, and decide nothing")

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 5) == 0:
            context.log.info(f"judging: {done}/{total} calls")

    plan = QualityPlan(config.share, config.max_samples, config.offline_max_examples, config.margin,
                       config.min_samples, config.seed)
    judged_at = datetime.now(UTC).replace(tzinfo=None)
    results = {}
    for version in versions:
        context.log.info(f"version {version}: judge {client.model} at {client.base_url}, "
                         f"rubric {rubric.name}@{rubric.version}")
        results[version] = judge_version(client, rubric, version, [a for a in live if a.version == version],
                                         offline[version], plan, on_done=progress)
        context.log.info(f"version {version}: {len(results[version].live)} live answers, "
                         f"{len(results[version].offline)} golden answers judged; "
                         f"{results[version].comparison.reason}")
    rows = [row for r in results.values()
            for row in result_rows(partition, r, rubric, client.model, judged_at, certified)]
    _replace_partition(warehouse, schema, partition, rows,
                       [summary_row(partition, r, rubric, judged_at, certified) for r in results.values()])
    usage = client.usage.as_dict(judge.price_in_per_1k, judge.price_out_per_1k)
    head = headline_version(results)
    by_version = {v: r.as_dict() for v, r in results.items()}

    run_tags = {"genops.dagster_run_id": context.run.run_id, "genops.kind": "online_quality",
                "genops.partition": partition, "genops.version": head, **trust_tags(certified, judge_certificate)}
    with mlflow.run(monitoring_experiment(spec.name), f"online-quality-{partition}", run_tags) as run_id:
        chart = comparison_chart_png({v: r.comparison for v, r in results.items()}, rubric.name,
                                     float(max(int(c) for c in rubric.choices)))
        out_dir = write_day_files(home.runs_dir / spec.name / "online_quality" / partition, chart,
                                  {**day_meta, "versions": by_version, "judge_usage": usage,
                                   "judge_certified": certified, "judge_status": trust},
                                  [dict(zip((name for name, _ in ROW_COLUMNS), row, strict=True)) for row in rows])
        mlflow.log_params(run_id, {"rubric": f"{rubric.name}@{rubric.version}", "judge_model": client.model,
                                   "judge_url": client.base_url, "share": config.share,
                                   "max_samples": config.max_samples,
                                   "offline_max_examples": config.offline_max_examples, "margin": config.margin,
                                   "min_samples": config.min_samples,
                                   "eval_run_id": eval_report.get("mlflow_run_id", "")})
        mlflow.log_metrics(run_id, {**{f"judge_{k}": float(n) for k, n in usage.items()}, **quality_metrics(results)})
        mlflow.log_artifacts(run_id, out_dir, "online_quality")

    headline = headline_metadata(results[head])
    if not certified:
        headline["reason"] = f"UNCERTIFIED judge, not a result: {headline['reason']}"
    return dg.MaterializeResult(metadata={
        **day_meta,
        "compared": True,
        "version": str(head),
        **headline,
        "judge_certified": certified,
        "judge_status": trust,
        "margin": float(config.margin),
        "comparisons": dg.MetadataValue.json(by_version),
        "judge_calls": int(usage["calls"]),
        "judge_cached": int(usage["cached"]),
        "judge_failures": int(usage["failures"]),
        "judge_prompt_tokens": int(usage["prompt_tokens"]),
        "judge_completion_tokens": int(usage["completion_tokens"]),
        "judge_usage": dg.MetadataValue.json(usage),
        "mlflow_run_id": run_id,
        "table": f"{schema}.{ROWS_TABLE}",
        "chart": dg.MetadataValue.md(png_markdown("online quality", chart)),
    })


def build_quality_assets(task: TaskRef, daily: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    return [dg.asset(
        key_prefix=[task.name], group_name=task_group(task, "monitoring"), kinds={"duckdb", "mlflow"},
        partitions_def=daily, deps=[dg.AssetKey("request_log")], ins=task_ins(task, "eval_report", "judge_certificate"),
        # New live answers start a refresh; a new evaluation or certificate alone does not (they
        # are read when the next answers arrive).
        automation_condition=eager_with_follow_up().ignore(
            dg.AssetSelection.assets(task_key(task, "eval_report"), task_key(task, "judge_certificate"),
                                     "base_model")),
    )(bind_task(online_quality, task))]
