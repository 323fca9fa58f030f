"""Model and dataset cards of each candidate version, logged to its MLflow training run."""

from __future__ import annotations

import dagster as dg

from genops_assets.components.binding import bind_task, task_group, task_key
from genops_assets.defs.governance.checks import PII_MARTS
from genops_assets.lib.tasks import TaskRef
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking
from resources.warehouse import DuckDBWarehouse, mart_schema

CARD_TAG = "genops.model_card_sha256"
SAFETY_REPORT = "safety_report"
MART_ORIGINS = {
    "golden_eval_dataset": "held-out golden split of the task's examples (dbt mart)",
    "sft_dataset": "train and validation splits of the task's examples (dbt mart)",
    "few_shot_examples": "few-shot pool drawn from the training side of the task's examples (dbt mart)",
    "preference_pairs": "people's agreed pairwise ratings in genops' rating store (dbt feedback mart)",
}


def mart_summaries(spec, warehouse: DuckDBWarehouse) -> list:
    """Every card-listed mart of the task: rows, digest, splits, PII scan, sources."""
    from genops_assets.lib.cards import MartSummary, source_digests, summarize_mart
    from genops_assets.lib.pii_scan import scan_frame

    schema = mart_schema(spec.name)
    sources = source_digests(spec.root, spec.raw_files())
    out = []
    for mart, (id_column, columns) in PII_MARTS.items():
        table = f"{schema}.{mart}"
        origin = f"{MART_ORIGINS[mart]}; task folder `{spec.root.name}`"
        mart_sources = {} if mart == "preference_pairs" else sources
        if not warehouse.table_exists(schema, mart):
            out.append(MartSummary(mart, table, None, None, origin=origin, sources=mart_sources))
            continue
        df = warehouse.query_df(f"select * from {table} order by {id_column}")
        findings = scan_frame(df, table=mart, id_column=id_column, columns=[c for c in columns if c in df.columns])
        out.append(summarize_mart(mart, table, df, origin=origin, sources=mart_sources,
                                  pii_findings=[f.as_dict() for f in findings],
                                  description=f"The `{mart}` mart of task `{spec.name}`: {MART_ORIGINS[mart]}."))
    return out


def write_cards(context: dg.AssetExecutionContext, eval_report: dict, tuned_adapter: dict, base_model: dict,
                task: TaskRef, warehouse: DuckDBWarehouse, mlflow: MlflowTracking, home: GenopsHome,
                safety_report: dict | None) -> dg.Output[dict]:
    """The model card of the candidate version and a dataset card per mart (golden, SFT, few-shot,
    preference pairs), written as MLflow artifacts `cards/model_card.md` and
    `cards/datasets/<mart>.md` of the version's training run; the version gets tag
    `genops.model_card_sha256`. Cost: seconds (the PII scan of the marts)."""
    from genops_assets.lib.cards import DATASET_CARDS_DIR, MODEL_CARD_PATH, card_digest, dataset_card
    from genops_assets.lib.cards import model_card as render_model_card
    from genops_assets.lib.hashing import atomic_dir

    spec = task.load()
    model_name, version, run_id = tuned_adapter["model_name"], str(tuned_adapter["version"]), tuned_adapter["run_id"]
    data = mart_summaries(spec, warehouse)
    params = mlflow.client().get_run(run_id).data.params
    card = render_model_card(spec=spec, tuned_adapter=tuned_adapter, base_model=base_model, eval_report=eval_report,
                             training_params=params, data=data, safety=safety_report)
    digest = card_digest(card)
    folder = home.runs_dir / "cards" / model_name / version
    with atomic_dir(folder) as tmp:
        (tmp / "model_card.md").write_text(card, encoding="utf-8")
        (tmp / "datasets").mkdir()
        for m in data:
            (tmp / "datasets" / f"{m.name}.md").write_text(dataset_card(m, spec.name), encoding="utf-8")
    mlflow.log_artifacts(run_id, folder, "cards")
    mlflow.set_version_tags(model_name, version, {CARD_TAG: digest})
    context.log.info(f"{model_name} v{version}: model card ({digest[:12]}) and {len(data)} dataset cards logged "
                     f"to run {run_id}")
    pii = {m.name: (None if m.pii_findings is None else len(m.pii_findings)) for m in data}
    value = {"model_name": model_name, "version": version, "run_id": run_id, "sha256": digest,
             "model_card": MODEL_CARD_PATH, "dataset_cards": [f"{DATASET_CARDS_DIR}/{m.name}.md" for m in data],
             "safety_report": safety_report is not None, "pii_findings": pii}
    return dg.Output(value, metadata={
        "model_card": dg.MetadataValue.md(card),
        "model_card_sha256": digest,
        "mlflow_run_id": run_id,
        "artifact_uri": mlflow.artifact_uri(run_id, "cards"),
        "dataset_cards": dg.MetadataValue.json(value["dataset_cards"]),
        "safety_report_included": safety_report is not None,
    })


def model_card(context: dg.AssetExecutionContext, eval_report: dict, tuned_adapter: dict, base_model: dict,
               task: TaskRef, warehouse: DuckDBWarehouse, mlflow: MlflowTracking,
               home: GenopsHome) -> dg.Output[dict]:
    """The model card of the candidate version (no safety report in this graph) and a dataset card
    per mart, logged to the version's MLflow training run. Cost: seconds."""
    return write_cards(context, eval_report, tuned_adapter, base_model, task, warehouse, mlflow, home, None)


def model_card_with_safety(context: dg.AssetExecutionContext, eval_report: dict, tuned_adapter: dict,
                           base_model: dict, safety_report: dict, task: TaskRef, warehouse: DuckDBWarehouse,
                           mlflow: MlflowTracking, home: GenopsHome) -> dg.Output[dict]:
    """The model card of the candidate version with its safety report, and a dataset card per mart
    (golden, SFT, few-shot, preference pairs), logged as MLflow artifacts `cards/model_card.md`
    and `cards/datasets/<mart>.md` of the version's training run; the version gets tag
    `genops.model_card_sha256`. Cost: seconds (the PII scan of the marts)."""
    return write_cards(context, eval_report, tuned_adapter, base_model, task, warehouse, mlflow, home,
                       safety_report)


# (prefix of the tuned version's assets, stage): SFT in the loop, DPO in preference tuning.
CARDED_STAGES = (("", "governance"), ("preference_", "preference"))


def build_governance_assets(task: TaskRef, graph_keys: set[dg.AssetKey]) -> list[dg.AssetsDefinition]:
    """A model-card asset per tuned version the task's graph produces (``model_card`` after
    ``eval_report``; ``preference_model_card`` after ``preference_eval_report``, in the preference
    stage); each reads the matching ``safety_report`` when the graph has one."""
    built = []
    for prefix, stage in CARDED_STAGES:
        if task_key(task, f"{prefix}tuned_adapter") not in graph_keys:
            continue
        ins = {"eval_report": dg.AssetIn(key=task_key(task, f"{prefix}eval_report")),
               "tuned_adapter": dg.AssetIn(key=task_key(task, f"{prefix}tuned_adapter"))}
        fn = model_card
        if task_key(task, f"{prefix}{SAFETY_REPORT}") in graph_keys:
            ins[SAFETY_REPORT] = dg.AssetIn(key=task_key(task, f"{prefix}{SAFETY_REPORT}"))
            fn = model_card_with_safety
        built.append(dg.asset(name=f"{prefix}model_card", key_prefix=[task.name], group_name=task_group(task, stage),
                              kinds={"mlflow"}, ins=ins, deps=[task_key(task, m) for m in PII_MARTS])(
            bind_task(fn, task)))
    return built
