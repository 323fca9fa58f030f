"""Prompt drift: live prompts of one UTC day against the task's training inputs.

drift_calibration embeds the training inputs and fits the flagging threshold once per training
set; prompt_drift scores each day against it and writes flagged prompts and their clusters to
``monitoring.flagged_prompts`` and ``monitoring.prompt_clusters``, an embedding-projector export
for TensorBoard, and a report to MLflow. The materialization's ``drift`` (bool) and
``flagged_share`` (float) metadata are read by sensors: keep their names and types.
"""


import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import numpy as np
from pydantic import Field

from genops_assets.components.binding import bind_task, task_group, task_ins, task_key
from genops_assets.defs.monitoring.automation import eager_with_follow_up
from genops_assets.defs.monitoring.common import (
    monitoring_experiment,
    naive_utc,
    run_in_background,
    utc_day,
)
from genops_assets.lib.hashing import atomic_dir, atomic_write_json, atomic_write_text, sha256_json
from genops_assets.lib.report import png_markdown
from genops_assets.lib.tasks import TaskRef
from resources.feedback_store import FeedbackStore, RequestQuery
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking
from resources.warehouse import DuckDBWarehouse, mart_schema, monitoring_schema

FLAGGED_TABLE = "flagged_prompts"
CLUSTERS_TABLE = "prompt_clusters"
LATEST = "latest"
EXPORT_INFO = "export.json"

FLAGGED_COLUMNS = (
    ("partition_key", "varchar"), ("request_id", "varchar"), ("ts", "timestamp"), ("model", "varchar"),
    ("adapter_version", "varchar"), ("prompt_version", "varchar"), ("input_text", "varchar"),
    ("score", "double"), ("threshold", "double"), ("cluster_id", "integer"), ("created_at", "timestamp"),
)
# What flagged.jsonl keeps of each flagged row.
FLAGGED_EXPORT = ("request_id", "ts", "input_text", "score", "cluster_id")
CLUSTER_COLUMNS = (
    ("partition_key", "varchar"), ("cluster_id", "integer"), ("size", "integer"), ("mean_score", "double"),
    ("top_terms", "varchar"), ("representatives", "varchar"), ("created_at", "timestamp"),
)


class DriftCalibrationConfig(dg.Config):
    k: int = Field(5, description="Training inputs a prompt's score averages over: the mean cosine distance "
                                  "to its k nearest neighbours among them.")
    quantile: float = Field(0.99, description="Quantile of held-out in-domain scores (validation split and "
                                              "golden set) used as the flagging threshold.")
    threshold_factor: float = Field(1.0, description="Multiplies that quantile: above 1 flags fewer prompts.")


class DriftConfig(dg.Config):
    drift_share: float = Field(0.2, description="Drift is reported when more than this share of the day's "
                                                "prompts is flagged ...")
    min_prompts: int = Field(20, description="... and the day holds at least this many prompts.")
    max_clusters: int = Field(8, description="Most clusters the flagged prompts are split into.")
    projector_train_rows: int = Field(500, description="Training inputs sampled into the projector export "
                                                       "(all held-out golden and live prompts go in).")


def _mart_texts(warehouse: DuckDBWarehouse, schema: str):
    for mart in ("sft_dataset", "golden_eval_dataset"):
        if not warehouse.table_exists(schema, mart):
            raise ValueError(f"{warehouse.path}: table {schema}.{mart} does not exist; materialize the "
                             "dbt marts (raw_task_examples, dbt_marts) before drift_calibration")
    sft = warehouse.query_df(f"select example_id, input_text, split from {schema}.sft_dataset "
                             "order by example_id")
    golden = warehouse.query_df(f"select example_id, input_text from {schema}.golden_eval_dataset "
                                "order by example_id")
    train = [str(t) for t in sft.loc[sft["split"] == "train", "input_text"]]
    validation = [str(t) for t in sft.loc[sft["split"] == "validation", "input_text"]]
    if not train:
        raise ValueError(f"{warehouse.path}: {schema}.sft_dataset has no 'train' rows: no reference to "
                         "measure prompts against")
    return train, validation, [str(t) for t in golden["input_text"]]


def _live_requests(feedback_store: FeedbackStore, start: datetime, end: datetime, task: str):
    # Every request of the window that carried a user input, whatever its status: a refused
    # request still shows what people ask for.
    return feedback_store.requests(RequestQuery(
        ("request_id", "ts", "model", "adapter_version", "prompt_version", "input_text"), task=task,
        start=start, end=end, requests_only=True, not_null=("input_text",), non_blank=("input_text",)))


def _flagged_rows(partition: str, live_df, live_texts: list[str], day, threshold: float,
                  now: datetime) -> list[dict]:
    """The day's flagged prompts as monitoring.flagged_prompts rows (column name -> value)."""
    rows = []
    for i in day.flagged_indices:
        request = live_df.iloc[i]
        rows.append({"partition_key": partition, "request_id": request["request_id"],
                     "ts": request["ts"].to_pydatetime(), "model": request["model"],
                     "adapter_version": request["adapter_version"], "prompt_version": request["prompt_version"],
                     "input_text": live_texts[i], "score": float(day.scores[i]), "threshold": threshold,
                     "cluster_id": day.cluster_of[i], "created_at": now})
    return rows


def _publish_latest(projector_root: Path, partition_dir: Path, partition: str) -> bool:
    """Copy the export to ``latest`` unless ``latest`` already holds a later day (a backfill of
    an old day must not replace what TensorBoard shows for the newest)."""
    latest = projector_root / LATEST
    info = latest / EXPORT_INFO
    if info.is_file():
        held = json.loads(info.read_text(encoding="utf-8")).get("partition", "")
        if held > partition:
            return False
    with atomic_dir(latest) as tmp:
        for item in partition_dir.iterdir():
            shutil.copy2(item, tmp / item.name)
    return True


def drift_calibration(
    context: dg.AssetExecutionContext,
    config: DriftCalibrationConfig,
    task: TaskRef,
    warehouse: DuckDBWarehouse,
    home: GenopsHome,
) -> dg.Output[dict]:
    """What prompt_drift measures each day against: the training inputs embedded
    (all-MiniLM-L6-v2), and a flagging threshold at a high quantile of held-out in-domain scores
    (validation split and golden set), with its in-domain false-flag rate measured on folds it
    was not fitted on. Grain: one per training set, in monitoring/drift_calibration/<digest>
    (immutable; the same marts and settings give the same folder). Cost: seconds (embeddings
    are cached)."""
    from genops_assets.lib.drift import DriftReference, calibrate
    from genops_assets.lib.embeddings import Embedder

    train, validation, golden = _mart_texts(warehouse, mart_schema(task.name))
    embedder = Embedder(cache_path=home.cache_dir / "embeddings.sqlite")
    train_embeddings = embedder.embed(train)
    heldout_embeddings = embedder.embed(validation + golden)
    calibration = calibrate(train_embeddings, heldout_embeddings, k=config.k, quantile=config.quantile,
                            factor=config.threshold_factor)
    reference = DriftReference(tuple(train), train_embeddings, tuple(golden), heldout_embeddings[len(validation):],
                               calibration, embedder.model_dir.name)
    digest = sha256_json({"train": train, "validation": validation, "golden": golden,
                          "calibration": calibration.as_dict(), "embedding_model": reference.embedding_model})
    folder = home.sub("monitoring", "drift_calibration") / digest[:16]
    if not folder.is_dir():
        with atomic_dir(folder) as tmp:
            reference.save(tmp)
    context.log.info(f"drift reference: {calibration.n_reference} training inputs, threshold "
                     f"{calibration.threshold:.4f} (in-domain false-flag rate {calibration.false_flag_rate:.3f} "
                     f"on {calibration.n_heldout} held-out inputs)")
    return dg.Output({"path": str(folder), **calibration.as_dict()}, metadata={
        "path": dg.MetadataValue.path(str(folder)),
        "threshold": dg.MetadataValue.float(calibration.threshold),
        "in_domain_false_flag_rate": dg.MetadataValue.float(calibration.false_flag_rate),
        "in_domain_flag_rate_in_sample": dg.MetadataValue.float(calibration.in_sample_flag_rate),
        "n_reference": calibration.n_reference,
        "n_heldout": calibration.n_heldout,
        "embedding_model": reference.embedding_model,
    })


def prompt_drift(
    context: dg.AssetExecutionContext,
    config: DriftConfig,
    drift_calibration: dict,
    task: TaskRef,
    warehouse: DuckDBWarehouse,
    feedback_store: FeedbackStore,
    mlflow: MlflowTracking,
    home: GenopsHome,
) -> dg.MaterializeResult:
    """Live prompts of one UTC day scored by their distance to the training inputs
    (all-MiniLM-L6-v2 embeddings, mean cosine distance to the k nearest) against the threshold of
    drift_calibration. Flagged prompts are clustered and described (representatives, top terms)
    for turning into training or preference data. Grain: one partition per day; its rows in
    monitoring_<task>.flagged_prompts and .prompt_clusters are each replaced in one
    transaction. Empty day: zero counts, no drift. Cost: seconds (embeddings are cached)."""
    run_in_background(context, home.background_nice)
    from genops_assets.lib.drift import (
        DriftReference,
        clusters_markdown,
        projector_rows,
        score_histogram_png,
        score_window,
        write_projector,
    )
    from genops_assets.lib.embeddings import Embedder

    spec = task.load()
    partition = context.partition_key
    start, end = (naive_utc(t) for t in utc_day(context))
    reference = DriftReference.load(drift_calibration["path"])
    calibration = reference.calibration
    live_df = _live_requests(feedback_store, start, end, spec.name)
    live_texts = [str(t) for t in live_df["input_text"]]
    live_embeddings = Embedder(cache_path=home.cache_dir / "embeddings.sqlite").embed(live_texts)
    day = score_window(reference, live_texts, live_embeddings, drift_share=config.drift_share,
                       min_prompts=config.min_prompts, max_clusters=config.max_clusters)
    summary = day.summary
    context.log.info(f"{partition}: {summary.live} live prompts, {summary.flagged} flagged "
                     f"(share {summary.flagged_share:.3f}, threshold {calibration.threshold:.4f}, in-domain "
                     f"false-flag rate {calibration.false_flag_rate:.3f}), {len(day.clusters)} cluster(s), "
                     f"drift={summary.drift}")

    run_tags = {"genops.dagster_run_id": context.run.run_id, "genops.partition": partition}
    with mlflow.run(monitoring_experiment(spec.name), f"prompt-drift-{partition}", run_tags) as run_id:
        now = datetime.now(UTC).replace(tzinfo=None)
        flagged = _flagged_rows(partition, live_df, live_texts, day, calibration.threshold, now)
        cluster_rows = [(partition, c.cluster_id, c.size, c.mean_score, json.dumps(list(c.top_terms)),
                         json.dumps(list(c.representatives), ensure_ascii=False), now) for c in day.clusters]
        # Both tables' rows of the day are replaced in one transaction.
        schema = monitoring_schema(spec.name)
        warehouse.replace_partitions(schema, "partition_key", partition, {
            FLAGGED_TABLE: (FLAGGED_COLUMNS, [tuple(row[name] for name, _ in FLAGGED_COLUMNS) for row in flagged]),
            CLUSTERS_TABLE: (CLUSTER_COLUMNS, cluster_rows)})

        projector_root = home.sub("monitoring", spec.name, "projector")
        partition_dir = projector_root / partition
        with atomic_dir(partition_dir) as tmp:
            export = write_projector(tmp, *projector_rows(reference, live_texts, live_embeddings, day,
                                                          config.projector_train_rows))
            atomic_write_json(tmp / EXPORT_INFO, {"partition": partition, "task": spec.name, **export,
                                                  "threshold": calibration.threshold})
        latest_updated = _publish_latest(projector_root, partition_dir, partition)

        md = clusters_markdown(day.clusters)
        png = score_histogram_png(day.scores, calibration.heldout_scores, calibration.threshold)
        report_dir = home.sub("monitoring", spec.name, "drift") / partition
        with atomic_dir(report_dir) as tmp:
            (tmp / "scores.png").write_bytes(png)
            (tmp / "clusters.md").write_text(md + "\n", encoding="utf-8")
            atomic_write_json(tmp / "summary.json", {
                "partition": partition, "window": [str(start), str(end)], "summary": summary.as_dict(),
                "calibration": calibration.as_dict(), "clusters": [c.as_dict() for c in day.clusters]})
            atomic_write_text(tmp / "flagged.jsonl", "".join(
                json.dumps({key: row[key] for key in FLAGGED_EXPORT}, ensure_ascii=False, default=str) + "\n"
                for row in flagged))

        mlflow.log_params(run_id, {"k": calibration.k, "quantile": calibration.quantile,
                                   "threshold_factor": calibration.factor, "drift_share": config.drift_share,
                                   "min_prompts": config.min_prompts, "n_reference": calibration.n_reference,
                                   "n_heldout": calibration.n_heldout, "embedding_model": reference.embedding_model,
                                   "calibration": drift_calibration["path"]})
        metrics = {"live": summary.live, "flagged": summary.flagged, "flagged_share": summary.flagged_share,
                   "threshold": calibration.threshold, "in_domain_false_flag_rate": calibration.false_flag_rate,
                   "drift": float(summary.drift), "clusters": len(day.clusters),
                   "heldout_mean_score": summary.heldout_mean, "live_mean_score": summary.live_mean,
                   "p_value": summary.p_value}
        mlflow.log_metrics(run_id, {k: v for k, v in metrics.items() if np.isfinite(v)})
        mlflow.log_artifacts(run_id, report_dir, "drift")
        mlflow.log_artifacts(run_id, partition_dir, "projector")

    return dg.MaterializeResult(metadata={
        "drift": dg.MetadataValue.bool(summary.drift),
        "flagged_share": dg.MetadataValue.float(summary.flagged_share),
        "flagged": dg.MetadataValue.int(summary.flagged),
        "live": dg.MetadataValue.int(summary.live),
        "threshold": dg.MetadataValue.float(calibration.threshold),
        "in_domain_false_flag_rate": dg.MetadataValue.float(calibration.false_flag_rate),
        "in_domain_flag_rate_in_sample": dg.MetadataValue.float(calibration.in_sample_flag_rate),
        "p_value": dg.MetadataValue.float(summary.p_value),
        "live_mean_score": dg.MetadataValue.float(summary.live_mean),
        "live_median_score": dg.MetadataValue.float(summary.live_median),
        "heldout_mean_score": dg.MetadataValue.float(summary.heldout_mean),
        "heldout_median_score": dg.MetadataValue.float(summary.heldout_median),
        "n_clusters": dg.MetadataValue.int(len(day.clusters)),
        "clusters": dg.MetadataValue.md(md),
        "score_histogram": dg.MetadataValue.md(png_markdown("scores", png)),
        "projector_dir": dg.MetadataValue.path(str(partition_dir)),
        "projector_latest_updated": dg.MetadataValue.bool(latest_updated),
        "mlflow_run_id": run_id,
        "tables": f"{schema}.{FLAGGED_TABLE}, {schema}.{CLUSTERS_TABLE}",
    })


def build_drift_assets(task: TaskRef, daily: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    group = task_group(task, "monitoring")
    calibration = dg.asset(
        key_prefix=[task.name], group_name=group, kinds={"numpy"},
        deps=[task_key(task, "sft_dataset"), task_key(task, "golden_eval_dataset")],
        # Recomputed when the marts change; prompt_drift then measures new days against it.
        automation_condition=dg.AutomationCondition.eager(),
    )(bind_task(drift_calibration, task))
    drift = dg.asset(
        key_prefix=[task.name], partitions_def=daily, group_name=group, kinds={"duckdb", "mlflow"},
        deps=[dg.AssetKey("request_log")], ins=task_ins(task, "drift_calibration"),
        # New live prompts start a refresh; a new calibration (new marts) alone does not.
        automation_condition=eager_with_follow_up().ignore(dg.AssetSelection.assets(task_key(task,
                                                                                             "drift_calibration"))),
    )(bind_task(prompt_drift, task))
    return [calibration, drift]
