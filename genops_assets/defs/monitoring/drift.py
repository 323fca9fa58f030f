"""Prompt drift: live prompts of one UTC day against the task's training inputs.

Writes flagged prompts and their clusters to ``monitoring.flagged_prompts`` and
``monitoring.prompt_clusters``, an embedding-projector export for TensorBoard, and a report
to MLflow. The materialization's ``drift`` (bool) and ``flagged_share`` (float) metadata are
read by sensors: keep their names and types.
"""


import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import numpy as np
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
from genops_assets.lib.hashing import atomic_dir, atomic_write_json
from resources.paths import GenopsHome
from resources.task import TaskResource
from resources.tracking import MlflowTracking
from resources.warehouse import FEEDBACK_SCHEMA, MART_SCHEMA, DuckDBWarehouse

FLAGGED_TABLE = "flagged_prompts"
CLUSTERS_TABLE = "prompt_clusters"
LATEST = "latest"
EXPORT_INFO = "export.json"

FLAGGED_COLUMNS = (
    ("partition_key", "varchar"), ("request_id", "varchar"), ("ts", "timestamp"), ("model", "varchar"),
    ("adapter_version", "varchar"), ("prompt_version", "varchar"), ("input_text", "varchar"),
    ("score", "double"), ("threshold", "double"), ("cluster_id", "integer"), ("created_at", "timestamp"),
)
CLUSTER_COLUMNS = (
    ("partition_key", "varchar"), ("cluster_id", "integer"), ("size", "integer"), ("mean_score", "double"),
    ("top_terms", "varchar"), ("representatives", "varchar"), ("created_at", "timestamp"),
)


class DriftConfig(dg.Config):
    k: int = Field(5, description="Training inputs a prompt's score averages over: the mean cosine distance "
                                  "to its k nearest neighbours among them.")
    quantile: float = Field(0.99, description="Quantile of held-out in-domain scores (validation split and "
                                              "golden set) used as the flagging threshold.")
    threshold_factor: float = Field(1.0, description="Multiplies that quantile: above 1 flags fewer prompts.")
    drift_share: float = Field(0.2, description="Drift is reported when more than this share of the day's "
                                                "prompts is flagged ...")
    min_prompts: int = Field(20, description="... and the day holds at least this many prompts.")
    max_clusters: int = Field(8, description="Most clusters the flagged prompts are split into.")
    projector_train_rows: int = Field(500, description="Training inputs sampled into the projector export "
                                                       "(all held-out golden and live prompts go in).")


def _mart_texts(warehouse: DuckDBWarehouse):
    for mart in ("sft_dataset", "golden_eval_dataset"):
        if not warehouse.table_exists(MART_SCHEMA, mart):
            raise ValueError(f"{warehouse.path}: table {MART_SCHEMA}.{mart} does not exist; materialize the "
                             "dbt marts (raw_task_examples, dbt_marts) before prompt_drift")
    sft = warehouse.query_df(f"select example_id, input_text, split from {MART_SCHEMA}.sft_dataset "
                             "order by example_id")
    golden = warehouse.query_df(f"select example_id, input_text from {MART_SCHEMA}.golden_eval_dataset "
                                "order by example_id")
    train = [str(t) for t in sft.loc[sft["split"] == "train", "input_text"]]
    validation = [str(t) for t in sft.loc[sft["split"] == "validation", "input_text"]]
    if not train:
        raise ValueError(f"{warehouse.path}: {MART_SCHEMA}.sft_dataset has no 'train' rows: no reference to "
                         "measure prompts against")
    return train, validation, [str(t) for t in golden["input_text"]]


def _live_requests(warehouse: DuckDBWarehouse, start: datetime, end: datetime):
    import pandas as pd

    cols = ["request_id", "ts", "model", "adapter_version", "prompt_version", "input_text"]
    if not Path(warehouse.path).exists() or not warehouse.table_exists(FEEDBACK_SCHEMA, "requests"):
        return pd.DataFrame(columns=cols)
    # Every request of the window that carried a user input, whatever its status: a refused
    # request still shows what people ask for.
    return warehouse.query_df(
        f"select {', '.join(cols)} from {FEEDBACK_SCHEMA}.requests "
        "where coalesce(event, 'request') = 'request' and ts >= ? and ts < ? "
        "and input_text is not null and trim(input_text) <> '' order by ts, request_id",
        [start, end],
    )


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


@dg.asset(
    partitions_def=daily,
    group_name="monitoring",
    kinds={"duckdb", "mlflow"},
    deps=[dg.AssetKey("request_log"), dg.AssetKey("sft_dataset"), dg.AssetKey("golden_eval_dataset")],
    # New live prompts start a refresh; retraining (new marts) alone does not.
    automation_condition=eager_with_follow_up().ignore(
        dg.AssetSelection.assets("sft_dataset", "golden_eval_dataset")),
)
def prompt_drift(
    context: dg.AssetExecutionContext,
    config: DriftConfig,
    task: TaskResource,
    warehouse: DuckDBWarehouse,
    mlflow: MlflowTracking,
    home: GenopsHome,
) -> dg.MaterializeResult:
    """Live prompts of one UTC day scored by their distance to the training inputs
    (all-MiniLM-L6-v2 embeddings, mean cosine distance to the k nearest). The threshold is a
    high quantile of held-out in-domain scores, with its in-domain false-flag rate measured on
    folds it was not fitted on. Flagged prompts are clustered and described (representatives,
    top terms) for turning into training or preference data. Grain: one partition per day;
    its rows in monitoring.flagged_prompts and in monitoring.prompt_clusters are each replaced
    in one transaction. Empty day: zero counts, no drift. Cost: seconds (embeddings are cached)."""
    run_in_background(context, home.background_nice)
    from genops_assets.lib import drift as d
    from genops_assets.lib.embeddings import Embedder

    spec = task.load()
    partition = context.partition_key
    start, end = (naive_utc(t) for t in utc_day(context))

    train, validation, golden = _mart_texts(warehouse)
    live_df = _live_requests(warehouse, start, end)
    live_texts = [str(t) for t in live_df["input_text"]]

    embedder = Embedder(cache_path=home.cache_dir / "embeddings.sqlite")
    ref = embedder.embed(train)
    held_emb = embedder.embed(validation + golden)
    live_emb = embedder.embed(live_texts)
    calibration = d.calibrate(ref, held_emb, k=config.k, quantile=config.quantile, factor=config.threshold_factor)
    live_scores = d.knn_distances(live_emb, ref, config.k)
    summary = d.summarize(live_scores, calibration, drift_share=config.drift_share, min_prompts=config.min_prompts)
    is_flagged = d.flag(live_scores, calibration.threshold)
    flagged_idx = [i for i, f in enumerate(is_flagged.tolist()) if f]
    labels, clusters = d.cluster_prompts([live_texts[i] for i in flagged_idx], live_emb[flagged_idx],
                                         live_scores[flagged_idx], max_clusters=config.max_clusters,
                                         background=train)
    cluster_of = {flagged_idx[j]: int(labels[j]) for j in range(len(flagged_idx))}
    context.log.info(f"{partition}: {summary.live} live prompts, {summary.flagged} flagged "
                     f"(share {summary.flagged_share:.3f}, threshold {calibration.threshold:.4f}, in-domain "
                     f"false-flag rate {calibration.false_flag_rate:.3f}), {len(clusters)} cluster(s), "
                     f"drift={summary.drift}")

    now = datetime.now(timezone.utc).replace(tzinfo=None)
    flagged_rows = []
    for i in flagged_idx:
        r = live_df.iloc[i]
        flagged_rows.append((partition, r["request_id"], r["ts"].to_pydatetime(), r["model"], r["adapter_version"],
                             r["prompt_version"], live_texts[i], float(live_scores[i]), calibration.threshold,
                             cluster_of[i], now))
    cluster_rows = [(partition, c.cluster_id, c.size, c.mean_score, json.dumps(list(c.top_terms)),
                     json.dumps(list(c.representatives), ensure_ascii=False), now) for c in clusters]
    # Both tables' rows of the day are replaced in one transaction.
    warehouse.replace_partitions(MONITORING_SCHEMA, "partition_key", partition, {
        FLAGGED_TABLE: (FLAGGED_COLUMNS, flagged_rows), CLUSTERS_TABLE: (CLUSTER_COLUMNS, cluster_rows)})

    # Projector: a sample of training inputs, the golden set, and every live prompt of the day.
    pick = d.subsample(len(train), config.projector_train_rows)
    rows_emb = [ref[pick], held_emb[len(validation):], live_emb]
    texts = [train[i] for i in pick] + golden + live_texts
    tags = (["train"] * len(pick) + ["golden"] * len(golden)
            + ["flagged" if f else "live" for f in is_flagged.tolist()])
    cluster_col = [None] * (len(pick) + len(golden)) + [cluster_of.get(i) for i in range(len(live_texts))]
    projector_root = home.sub("monitoring", "projector")
    partition_dir = projector_root / partition
    with atomic_dir(partition_dir) as tmp:
        export = d.write_projector(tmp, np.concatenate(rows_emb), texts, tags, cluster_col)
        atomic_write_json(tmp / EXPORT_INFO, {"partition": partition, "task": spec.name, **export,
                                              "threshold": calibration.threshold})
    latest_updated = _publish_latest(projector_root, partition_dir, partition)

    md = d.clusters_markdown(clusters)
    png = d.score_histogram_png(live_scores, calibration.heldout_scores, calibration.threshold)
    report_dir = home.sub("monitoring", "drift") / partition
    with atomic_dir(report_dir) as tmp:
        (tmp / "scores.png").write_bytes(png)
        (tmp / "clusters.md").write_text(md + "\n", encoding="utf-8")
        atomic_write_json(tmp / "summary.json", {"partition": partition, "window": [str(start), str(end)],
                                                 "summary": summary.as_dict(), "calibration": calibration.as_dict(),
                                                 "clusters": [c.as_dict() for c in clusters]})
        with open(tmp / "flagged.jsonl", "w", encoding="utf-8") as fh:
            for row in flagged_rows:
                fh.write(json.dumps({"request_id": row[1], "ts": str(row[2]), "input_text": row[6],
                                     "score": row[7], "cluster_id": row[9]}, ensure_ascii=False) + "\n")

    run_id = mlflow.start_run(monitoring_experiment(spec.name), f"prompt-drift-{partition}",
                              tags={"genops.dagster_run_id": context.run.run_id, "genops.partition": partition})
    mlflow.log_params(run_id, {"k": config.k, "quantile": config.quantile,
                               "threshold_factor": config.threshold_factor, "drift_share": config.drift_share,
                               "min_prompts": config.min_prompts, "n_reference": calibration.n_reference,
                               "n_heldout": calibration.n_heldout, "embedding_model": embedder.model_dir.name})
    metrics = {"live": summary.live, "flagged": summary.flagged, "flagged_share": summary.flagged_share,
               "threshold": calibration.threshold, "in_domain_false_flag_rate": calibration.false_flag_rate,
               "drift": float(summary.drift), "clusters": len(clusters), "heldout_mean_score": summary.heldout_mean,
               "live_mean_score": summary.live_mean, "p_value": summary.p_value}
    mlflow.log_metrics(run_id, {k: v for k, v in metrics.items() if np.isfinite(v)})
    mlflow.log_artifacts(run_id, report_dir, "drift")
    mlflow.log_artifacts(run_id, partition_dir, "projector")
    mlflow.end_run(run_id)

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
        "n_clusters": dg.MetadataValue.int(len(clusters)),
        "clusters": dg.MetadataValue.md(md),
        "score_histogram": png_md("scores", png),
        "projector_dir": dg.MetadataValue.path(str(partition_dir)),
        "projector_latest_updated": dg.MetadataValue.bool(latest_updated),
        "mlflow_run_id": run_id,
        "tables": f"{MONITORING_SCHEMA}.{FLAGGED_TABLE}, {MONITORING_SCHEMA}.{CLUSTERS_TABLE}",
    })
