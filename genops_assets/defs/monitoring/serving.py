"""Serving health per UTC day: request metrics from the feedback store, and the endpoint
process's resource samples."""

import json
import re
from datetime import UTC, datetime

import dagster as dg

from genops_assets.components.binding import bind_task, task_group
from genops_assets.defs.monitoring.automation import eager_with_follow_up
from genops_assets.defs.monitoring.common import (
    MONITORING_SCHEMA,
    monitoring_experiment,
    run_in_background,
    utc_day,
)
from genops_assets.lib.report import png_markdown
from genops_assets.lib.tasks import TaskRef
from resources.feedback_store import FeedbackStore, RequestQuery
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking
from resources.warehouse import DuckDBWarehouse, monitoring_schema

SERVING_TABLE = "serving_metrics"
RESOURCE_TABLE = "resource_usage"
KIND_TAG = "genops.kind"
PARTITION_TAG = "genops.partition"

# The overall numbers shown as Dagster metadata and logged to MLflow.
KEY_NUMBERS = ("request_count", "error_count", "error_rate", "requests_per_s", "output_tokens_per_s",
               "active_requests_per_s", "latency_p50_s", "latency_p95_s", "latency_p99_s", "queue_p50_s",
               "queue_p95_s", "prompt_tokens_total", "completion_tokens_total", "prompt_tokens_mean",
               "completion_tokens_mean", "valid_json_rate", "json_found_rate", "schema_valid_rate",
               "schema_valid_lenient_rate")
# Per version in MLflow (the full set per version is in the table and summary.json).
GROUP_NUMBERS = ("request_count", "error_rate", "latency_p95_s", "valid_json_rate")

REQUEST_COLUMNS = ("request_id", "ts", "event", "model", "adapter_version", "prompt_version", "status", "error",
                   "latency_s", "queue_s", "prompt_tokens", "completion_tokens", "finish_reason", "response_text",
                   "record_json")


def _metric_key(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", text)


def serving_metrics(
    context: dg.AssetExecutionContext,
    warehouse: DuckDBWarehouse,
    feedback_store: FeedbackStore,
    mlflow: MlflowTracking,
    task: TaskRef,
    home: GenopsHome,
) -> dg.MaterializeResult:
    """One UTC day of the task's requests (and the base model's) from `feedback.requests`, per
    served adapter version and prompt version and overall: request count, throughput, latency p50/p95/p99 and queue
    p50/p95 of answered requests (numpy 'linear' percentiles), tokens, error rate and errors by
    class, and task health of live answers (strict / lenient valid-JSON rate, schema conformance
    against the task's output schema). Rows go to `monitoring_<task>.serving_metrics` (the partition
    replaced in one transaction: an `overall` row and one `version` row per group); plots and a
    JSON summary to the day's MLflow run in `genops/<task>/monitoring`. A day without requests is
    a result: request_count 0, no plots. Cost: seconds."""
    run_in_background(context, home.background_nice)
    from genops_assets.lib.hashing import atomic_dir
    from genops_assets.lib.monitoring import (
        SERVING_COLUMNS,
        error_chart_png,
        latency_chart_png,
        serving_report,
        serving_table_md,
        tokens_chart_png,
    )

    spec = task.load()
    partition = context.partition_key
    start, end = utc_day(context)
    if not feedback_store.has_requests():
        raise RuntimeError(f"no table {feedback_store.table_ref} in the feedback store: materialize request_log first")
    df = feedback_store.requests(RequestQuery(REQUEST_COLUMNS, task=spec.name, start=start, end=end,
                                              order_by=("ts", "source_file", "source_offset")))
    report = serving_report(df, start, end, spec.output_schema, now=datetime.now(UTC))
    schema = monitoring_schema(spec.name)
    warehouse.replace_partition(schema, SERVING_TABLE, SERVING_COLUMNS, "partition_key", partition,
                                report.rows(partition))
    o = report.overall
    context.log.info(f"serving {partition}: {o.request_count} requests in {len(report.groups)} version group(s), "
                     f"{o.error_count} errors, latency p95 {o.latency_p95_s}, valid JSON {o.valid_json_rate}")

    plots: dict[str, bytes] = {}
    if o.request_count:
        if any(g.latency_p50_s is not None for g in report.groups):
            plots["latency"] = latency_chart_png(report.groups)
        if o.error_count:
            plots["errors"] = error_chart_png(o)
        plots["tokens"] = tokens_chart_png(report.groups)
    summary = report.summary()

    # One MLflow run per day: re-materializing it (eagerly, at each request-log load) updates
    # that run instead of adding one per load.
    run_tags = {"genops.dagster_run_id": context.run.run_id, "genops.task": spec.name, KIND_TAG: SERVING_TABLE,
                PARTITION_TAG: partition}
    with mlflow.run(monitoring_experiment(spec.name), f"{SERVING_TABLE}-{partition}", run_tags,
                    reopen_matching=(KIND_TAG, PARTITION_TAG)) as run_id:
        day_dir = home.runs_dir / spec.name / SERVING_TABLE / partition
        with atomic_dir(day_dir) as tmp:
            for name, png in plots.items():
                (tmp / f"{name}.png").write_bytes(png)
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str),
                                              encoding="utf-8")
        metrics = {k: getattr(o, k) for k in KEY_NUMBERS}
        for g in report.groups:
            prefix = _metric_key(f"{g.served_by}.adapter_{g.adapter_version}.prompt_{g.prompt_version}")
            metrics.update({f"{prefix}.{k}": getattr(g, k) for k in GROUP_NUMBERS})
        mlflow.log_metrics(run_id, {k: float(v) for k, v in metrics.items() if v is not None})
        mlflow.log_artifacts(run_id, day_dir, SERVING_TABLE)

    metadata: dict[str, object] = {
        "partition": partition,
        "window": f"{start.isoformat()} .. {end.isoformat()}",
        "table": f"{schema}.{SERVING_TABLE}",
        "versions": len(report.groups),
        "reloads": report.reloads,
        "errors_by_class": dg.MetadataValue.json(o.errors_by_class),
        "metrics": dg.MetadataValue.md(serving_table_md(report)),
        "mlflow_run_id": run_id,
        **{k: dg.MetadataValue.float(float(getattr(o, k))) for k in KEY_NUMBERS if getattr(o, k) is not None},
        **{f"{name}_plot": dg.MetadataValue.md(png_markdown(name, png)) for name, png in plots.items()},
    }
    return dg.MaterializeResult(metadata=metadata)


def resource_usage(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse,
                   home: GenopsHome) -> dg.MaterializeResult:
    """One UTC day of the endpoint process's resource samples (`<endpoint>/resources.jsonl`,
    written by the server's sampler thread): CPU percent and RSS mean / p95 / max, most threads,
    most GPU memory allocated and reserved, and a plot of CPU and memory over the day. A row per
    day in `monitoring.resource_usage` (replaced in one transaction). Refreshed with the request
    log, which the same server writes. A day without samples (the server was down, or a vLLM
    backend serves) is a result with sample_count 0. Cost: one pass over the samples file."""
    run_in_background(context, home.background_nice)
    from genops_assets.lib.monitoring import (
        RESOURCE_COLUMNS,
        read_resource_samples,
        resource_chart_png,
        resource_row,
        summarize_resources,
    )
    from genops_assets.serving.sampler import RESOURCES_FILE

    partition = context.partition_key
    start, end = utc_day(context)
    path = home.endpoint_dir / RESOURCES_FILE
    samples, malformed = read_resource_samples(path, start, end)
    for problem in malformed[:20]:
        context.log.warning(f"skipped malformed resource sample: {problem}")
    summary = summarize_resources(samples)
    warehouse.replace_partition(MONITORING_SCHEMA, RESOURCE_TABLE, RESOURCE_COLUMNS, "partition_key", partition,
                                [resource_row(partition, start, end, summary)])
    context.log.info(f"resources {partition}: {summary['sample_count']} samples from {path}, "
                     f"RSS max {summary['rss_bytes_max']}, CPU p95 {summary['cpu_percent_p95']}")
    numbers = {k: v for k, v in summary.items() if k not in ("pids", "first_ts", "last_ts")}
    metadata: dict[str, object] = {
        "partition": partition,
        "source": dg.MetadataValue.path(str(path)),
        "table": f"{MONITORING_SCHEMA}.{RESOURCE_TABLE}",
        "pids": dg.MetadataValue.json(summary["pids"]),
        "malformed_lines": len(malformed),
        **{k: dg.MetadataValue.float(float(v)) for k, v in numbers.items() if v is not None},
    }
    if summary["sample_count"]:
        metadata["resources_plot"] = dg.MetadataValue.md(png_markdown("resources", resource_chart_png(samples)))
    return dg.MaterializeResult(metadata=metadata)


def build_serving_monitoring_assets(task: TaskRef, daily: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    return [dg.asset(key_prefix=[task.name], group_name=task_group(task, "monitoring"), kinds={"duckdb", "mlflow"},
                     partitions_def=daily, deps=[dg.AssetKey("request_log")],
                     automation_condition=eager_with_follow_up())(bind_task(serving_metrics, task))]


def build_resource_usage(daily: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    """The endpoint process's resources: one process serves every task, so one asset."""
    return dg.asset(group_name="monitoring", kinds={"duckdb"}, partitions_def=daily,
                    deps=[dg.AssetKey("request_log")], automation_condition=eager_with_follow_up())(resource_usage)
