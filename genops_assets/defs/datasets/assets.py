"""Raw task examples into DuckDB, then the dbt marts (staging -> golden / SFT / few-shot)."""


import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import DagsterDbtTranslator, DbtCliResource, DbtProject, dbt_assets

from genops_assets.components.binding import bind_task, task_group, task_key
from genops_assets.lib.hashing import sha256_file, sha256_json
from genops_assets.lib.labels import scan_labels
from genops_assets.lib.tasks import GOLDEN_ADDITIONS, TaskRef, read_raw_file
from resources import DBT_PROJECT_DIR
from resources.feedback_store import FeedbackStore, RequestQuery
from resources.paths import GenopsHome
from resources.warehouse import FEEDBACK_SCHEMA, DuckDBWarehouse

RAW_ASSET = "raw_task_examples"
MARTS = ("golden_eval_dataset", "sft_dataset", "few_shot_examples")
FEEDBACK_MARTS = ("preference_pairs", "human_corrections", "human_judgements", "golden_proposals")

dbt_project = DbtProject(project_dir=DBT_PROJECT_DIR, profiles_dir=DBT_PROJECT_DIR)


def labelled_feedback(context, spec, home: GenopsHome, feedback_store: FeedbackStore) -> tuple[list[tuple], dict]:
    """Reviewed live answers from ``<home>/feedback/labels/<task>/`` as raw rows. A label that names
    only a request id takes the question from the feedback store. Lines that do not fit the
    task are reported with file:line and left out (the feedback sensor reports them too)."""
    folder = home.task_labels_dir(spec.name)
    scan = scan_labels(folder, spec)
    for issue in scan.issues:
        context.log.warning(f"label left out: {folder}/{issue}")
    if not scan.rows:
        return [], {}
    if spec.contexts is not None:
        # A label line holds a question and its answer, not the passages the model was shown.
        context.log.warning(f"{len(scan.rows)} label(s) in {folder} left out: task '{spec.name}' needs the "
                            f"retrieved contexts ('{spec.contexts.retrieved}') of each example, which labels "
                            "do not carry")
        return [], {}
    asked: dict[str, str] = {}
    wanted = sorted({r.request_id for r in scan.rows if r.input_text is None and r.request_id})
    if wanted:
        df = feedback_store.requests(RequestQuery(("request_id", "input_text"), request_ids=tuple(wanted),
                                                  not_null=("input_text",)))
        asked = dict(zip(df["request_id"], df["input_text"], strict=True))
    rows, missing = [], []
    for r in scan.rows:
        text = r.input_text or asked.get(r.request_id or "")
        if text is None:
            missing.append(f"{r.source_file}:{r.line} (request {r.request_id})")
            continue
        rows.append((f"feedback/labels/{spec.name}/{r.source_file}", r.line, text,
                     json.dumps(r.output, ensure_ascii=False)))
    if missing:
        context.log.warning(f"labels whose request id is not in {feedback_store.table_ref}, left out: {missing}")
    return rows, {"rows": len(rows), "digest": scan.digest, "issues": len(scan.issues), "missing": len(missing)}


# Bumped when raw_task_examples' logic changes: it is then stale and reloaded.
RAW_CODE_VERSION = "raw-1"


def raw_examples_version(spec, home: GenopsHome) -> str:
    """Data version of raw_task_examples: the digest of what it reads, the task's data files
    (names and contents) and the valid reviewer labels. Sensors compute it the same way to tell
    whether a retrain has new data to load. (A label naming only a request id is loaded once the
    request log holds that request: the label, not the log, is what versions it.)"""
    files = {p.relative_to(spec.root).as_posix(): sha256_file(p) for p in spec.raw_files()}
    labels = scan_labels(home.task_labels_dir(spec.name), spec).digest
    return sha256_json({"files": files, "labels": labels})[:16]


def raw_task_examples(
    context: dg.AssetExecutionContext, task: TaskRef, warehouse: DuckDBWarehouse, feedback_store: FeedbackStore,
    home: GenopsHome,
) -> dg.MaterializeResult:
    """Every example of the task (its data files plus ``incoming/``) and every reviewed
    live answer (``<home>/feedback/labels/<task>/``), one row each, loaded into ``raw.task_examples``.
    Files are all read before anything is written, and the task's rows are replaced in one
    transaction. Cost: seconds.
    """
    spec = task.load()
    rows: list[tuple] = []
    files: dict[str, Any] = {}
    for path in spec.raw_files():
        before = len(rows)
        for ex in read_raw_file(path, spec):
            row = (ex.source_file, ex.source_row, ex.input_text, json.dumps(ex.output, ensure_ascii=False))
            if spec.contexts is not None:
                row += (json.dumps(ex.contexts, ensure_ascii=False),
                        None if ex.reference_contexts is None else json.dumps(ex.reference_contexts,
                                                                             ensure_ascii=False))
            rows.append(row)
        rel = path.relative_to(spec.root).as_posix()
        files[rel] = {"rows": len(rows) - before, "sha256": sha256_file(path)}
    if not rows:
        raise ValueError(f"task '{spec.name}': no examples in {[str(p) for p in spec.raw_files()]}")
    label_rows, labels = labelled_feedback(context, spec, home, feedback_store)
    if label_rows:
        rows += label_rows
        files["feedback/labels"] = labels
    warehouse.replace_raw_examples(spec.name, rows)
    context.log.info(f"loaded {len(rows)} raw examples of task '{spec.name}' from {len(files)} source(s)"
                     + (f", {len(label_rows)} of them reviewed live answers" if label_rows else ""))
    return dg.MaterializeResult(
        metadata={
            "task": spec.name,
            "rows": len(rows),
            "labelled_feedback_rows": len(label_rows),
            "files": dg.MetadataValue.json(files),
            "digest": sha256_json(files),
            "table": "raw.task_examples",
        },
        data_version=dg.DataVersion(raw_examples_version(spec, home)),
    )


class GenopsDbtTranslator(DagsterDbtTranslator):
    """One task's view of the dbt project: a model is ``<task>/<model>`` in the task's datasets
    group; the raw source is the task's ``raw_task_examples`` asset, the ``feedback`` sources the
    tables its ``human_ratings`` step writes."""

    def __init__(self, task: str):
        super().__init__()
        self.task = task

    def get_asset_spec(self, manifest: Mapping[str, Any], unique_id: str, project):
        spec = super().get_asset_spec(manifest, unique_id, project)
        props = self.get_resource_props(manifest, unique_id)
        if props["resource_type"] == "source" and props["name"] == "task_examples":
            return spec.replace_attributes(key=task_key(self.task, RAW_ASSET))
        if props["resource_type"] == "source" and props["source_name"] == FEEDBACK_SCHEMA:
            from genops_assets.defs.feedback.ratings import TABLE_ASSETS

            return spec.replace_attributes(key=task_key(self.task, TABLE_ASSETS[props["name"]]))
        if props["resource_type"] == "model":
            return spec.replace_attributes(key=task_key(self.task, props["name"]), group_name=f"{self.task}_datasets")
        return spec


def _manifest_path() -> Path:
    path = dbt_project.manifest_path
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{path} is missing: the dbt manifest is built by `make dbt-manifest` "
            "(part of `make install`); run it once after changing the dbt project"
        )
    return Path(path)


def dbt_vars(spec) -> dict[str, Any]:
    s = spec.splits
    return {
        "task": spec.name,
        "golden_fraction": s.golden_fraction,
        "validation_fraction": s.validation_fraction,
        "near_duplicate_jaccard": s.near_duplicate_jaccard,
        "few_shot_per_label": s.few_shot_per_label,
        "few_shot_label_field": s.few_shot_label_field,
        "heldout_fraction": spec.feedback.heldout_fraction,
        "min_item_ratings": spec.feedback.min_item_ratings,
        "min_item_agreement": spec.feedback.min_item_agreement,
        "task_has_contexts": spec.contexts is not None,
        "golden_additions_file": GOLDEN_ADDITIONS,
    }


def dbt_marts(
    context: dg.AssetExecutionContext, dbt: DbtCliResource, task: TaskRef, warehouse: DuckDBWarehouse
):
    """dbt-duckdb staging and marts: dedup (exact and near), stable ids, held-out golden set,
    train/validation split, few-shot pool, in the task's schema (`marts_<task>`). Cost: seconds."""
    spec = task.load()
    # The dbt profile takes the warehouse path as a variable (dbt/profiles.yml); the task
    # variable picks the rows and the schema (dbt/macros/generate_schema_name.sql).
    dbt_args = ["build", "--vars", json.dumps({**dbt_vars(spec), "duckdb_path": warehouse.path})]
    yield from dbt.cli(dbt_args, context=context).stream()


def build_raw_examples(task: TaskRef) -> dg.AssetsDefinition:
    return dg.asset(name=RAW_ASSET, key_prefix=[task.name], group_name=task_group(task, "datasets"),
                    kinds={"duckdb"}, code_version=RAW_CODE_VERSION)(bind_task(raw_task_examples, task))


def build_dataset_assets(task: TaskRef) -> list[dg.AssetsDefinition]:
    """The task's raw examples and its dbt marts (same manifest as every task, keys and schema
    of its own)."""
    marts = dbt_assets(manifest=_manifest_path(), dagster_dbt_translator=GenopsDbtTranslator(task.name),
                       project=dbt_project, name=f"{task.name}__dbt_marts")(bind_task(dbt_marts, task))
    return [build_raw_examples(task), marts]
