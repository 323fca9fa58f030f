"""A task's own judge: a LoRA on the base model tuned on people's choices and objective probe pairs,
registered in MLflow, and certified on held-out human labels and golden probes before it may judge."""

import json
from collections.abc import Mapping
from typing import Any

import dagster as dg

from genops_assets import __version__
from genops_assets.components.binding import bind_task, task_group, task_key
from genops_assets.defs.judge_tuning.config import JudgeTuningConfig
from genops_assets.defs.tuning.assets import NOT_COMPUTED, TRAINING_LOCK, TRAINING_RETRY_POLICY, progress_logger
from genops_assets.lib.hashing import sha256_json
from genops_assets.lib.integrity import files_digest, record_folder
from genops_assets.lib.locks import exclusive
from genops_assets.lib.tasks import TaskRef
from genops_assets.lib.training import TRAINING_CODE_VERSION, TrainingInputError, train_lora
from genops_assets.lib.tuning import ProgressLine, history_until, tracked_metrics
from genops_assets.serving.protocol import judge_name
from resources.judge import BASE_MODEL_PATH_TAG, CERTIFIED, JudgeResource, judge_model_name
from resources.paths import GenopsHome
from resources.tracking import ASSET_VALUE_TAG, VERSION_KEY_TAG, MlflowTracking, integrity_tags
from resources.warehouse import DuckDBWarehouse, mart_schema

JUDGE_CODE_VERSION = f"genops-{__version__}/judge-1/{TRAINING_CODE_VERSION}"
HUMAN_MART = "human_judgements"


def _mart(warehouse: DuckDBWarehouse, task: str, table: str, where: str = "", order: str = "example_id"):
    schema = mart_schema(task)
    if not warehouse.table_exists(schema, table):
        raise dg.Failure(f"{schema}.{table} does not exist: materialize the task's datasets (and, for "
                         f"{HUMAN_MART}, human_ratings and its dbt models) first", allow_retries=False)
    return warehouse.query_df(f"select * from {schema}.{table} {where} order by {order}")


def _examples(df) -> list[tuple[str, str, dict]]:
    return [(r["example_id"], r["input_text"], json.loads(r["output_json"])) for r in df.to_dict(orient="records")]


def _missed_by(certificate: Mapping[str, Any]) -> dict[str, Any]:
    """Each failed check of ``certificate.as_dict()`` with its value, threshold and how far off."""
    out = {}
    for name, check in (certificate.get("checks") or {}).items():
        if not isinstance(check, Mapping) or check.get("passed"):
            continue
        value, threshold = check.get("value"), check.get("threshold")
        numbers = isinstance(value, (int, float)) and isinstance(threshold, (int, float))
        out[name] = {"value": NOT_COMPUTED if value is None else value, "threshold": threshold,
                     "missed_by": round(abs(float(value) - float(threshold)), 4) if numbers else NOT_COMPUTED,
                     **{k: check[k] for k in ("direction", "detail") if check.get(k)}}
    return out


def register_judge_version(mlflow: MlflowTracking, model_name: str, run_id: str, adapter_dir, base_model: dict,
                           tags: Mapping[str, str], description: str):
    """Log ``adapter_dir`` to the run (``adapter/``) and register it as a new version of
    ``model_name``, tagged with the sha256 of each of its files (checked whenever it is fetched)
    and the base model it was trained on. Returns (the version, the adapter digest)."""
    files = record_folder(adapter_dir)  # checked against the manifest training wrote
    mlflow.log_artifacts(run_id, adapter_dir, "adapter")
    digest = files_digest(files)
    mv = mlflow.register(model_name, mlflow.artifact_uri(run_id, "adapter"), run_id, tags={
        **tags, **integrity_tags(files), BASE_MODEL_PATH_TAG: str(base_model["path"]),
        "genops.base_model_digest": base_model["folder_digest"]}, description=description)
    return mv, digest


def _train_and_register(context, spec, cfg, plan, base_model: dict, config: JudgeTuningConfig,
                        mlflow: MlflowTracking, home: GenopsHome) -> dict:
    """Train the judge LoRA on ``plan`` and register it as a version of ``genops-<task>-judge``
    (params, losses, the pair datasets with their digests); returns the asset value it records."""
    from genops_assets.lib.judge_tuning import pairs_frame

    model_name = judge_model_name(spec.name)
    tags = {"genops.dagster_run_id": context.run.run_id, "genops.code_version": JUDGE_CODE_VERSION,
            "genops.task": spec.name, "genops.kind": "judge_tuning", "genops.rubric": plan.digests["rubric"]}
    with mlflow.run(f"genops/{spec.name}", f"judge-{plan.version_key[:8]}",
                    {**tags, VERSION_KEY_TAG: plan.version_key}) as run_id:
        mlflow.log_params(run_id, {**cfg.as_params(), **plan.counts, "base_model": base_model["name"],
                                   "pairwise_rubric": plan.digests["rubric"], "probe_reference": config.probe_reference,
                                   "train_examples": len(plan.train), "validation_examples": len(plan.validation)})
        for split, pairs in (("train", plan.train_pairs), ("validation", plan.validation_pairs)):
            mlflow.log_dataset(run_id, pairs_frame(pairs), name=f"{spec.name}-judge-{split}",
                               source=f"{mart_schema(spec.name)}.{HUMAN_MART}+sft_dataset probes",
                               digest=plan.digests[split], context="training" if split == "train" else "validation")
        on_progress = progress_logger(context, mlflow, run_id, tracked_metrics, ProgressLine(label="judge tuning"))
        adapter_dir = home.models_dir / "judges" / plan.version_key
        try:
            with exclusive(home.runs_dir / TRAINING_LOCK, on_wait=context.log.warning):
                result = train_lora(base_model["path"], plan.train, plan.validation, cfg, adapter_dir=adapter_dir,
                                    work_dir=home.runs_dir / f"judge-{plan.version_key}", on_progress=on_progress,
                                    data_digest=sha256_json(plan.digests), resume=config.resume,
                                    on_message=context.log.info)
        except TrainingInputError as exc:
            raise dg.Failure(str(exc), allow_retries=False) from exc
        if result.resumed_from_step:
            for record in history_until(result.history, result.resumed_from_step):
                mlflow.log_metrics(run_id, tracked_metrics(record), step=int(record["step"]))
        mv, digest = register_judge_version(
            mlflow, model_name, run_id, adapter_dir, base_model, {**tags, VERSION_KEY_TAG: plan.version_key},
            description=f"LoRA judge r={cfg.rank} on {base_model['name']}, {result.steps} steps, "
                        f"{plan.counts['train_pairs']} pairs ({plan.counts['human_pairs']} human)")
        value = {"model_name": model_name, "version_key": plan.version_key, "adapter_dir": str(adapter_dir),
                 "adapter_digest": digest, "run_id": run_id, "base_model_digest": base_model["folder_digest"],
                 "base_model_path": base_model["path"], "dataset_digests": plan.digests, "counts": plan.counts,
                 "steps": result.steps, "skipped_too_long": len(result.skipped_too_long),
                 "final_train_loss": result.last("loss"), "final_eval_loss": result.last("eval_loss"),
                 "runtime_s": round(result.runtime_s, 1)}
        value["version"] = mv.version
        mlflow.set_version_tags(model_name, mv.version, {ASSET_VALUE_TAG: json.dumps(value)})
    context.log.info(f"registered {model_name} v{mv.version}: {result.steps} steps in {result.runtime_s:.0f}s")
    return value


def _certify(context, spec, rubric, version: str, base_model: dict, config: JudgeTuningConfig,
             warehouse: DuckDBWarehouse, judge: JudgeResource, mlflow: MlflowTracking, home: GenopsHome):
    """The version's certificate on the held-out human labels (split ``certify``) and the golden
    probes, recorded in an MLflow run of its own; alias ``certified`` moves to it only when it passed."""
    from genops_assets.lib.cache import CallCache
    from genops_assets.lib.judge_certificate import certify, human_choices_from_frame
    from genops_assets.lib.probes import probe_pairs

    human = human_choices_from_frame(_mart(warehouse, spec.name, HUMAN_MART, "where split = 'certify'", "item_id"))
    golden = _examples(_mart(warehouse, spec.name, "golden_eval_dataset"))
    probes = probe_pairs(golden, spec, seed=config.seed, limit=spec.judge.max_probe_examples)
    model_name = judge_model_name(spec.name)
    client = judge.connect_version(base_model["path"], spec.name, version,
                                   cache=CallCache(home.cache_dir / "calls.sqlite"))
    context.log.info(f"certifying {model_name} v{version} as {client.model}: {len(human)} held-out human labels, "
                     f"{len(probes)} golden probes")
    cert = certify(client, rubric, human, probes, spec.judge, repeats=config.certify_repeats, seed=config.seed,
                   log=context.log.info)
    as_dict = cert.as_dict()
    with mlflow.run(f"genops/{spec.name}", f"judge-certificate-v{version}", {
            "genops.dagster_run_id": context.run.run_id, "genops.kind": "judge_certificate",
            "genops.judge_model": model_name, "genops.judge_version": str(version)}) as run_id:
        mlflow.log_params(run_id, {"judge_model": client.model, "rubric": f"{rubric.name}@{rubric.version}",
                                   "human_labels": len(human), "probes": len(probes), "passed": cert.passed})
        mlflow.log_metrics(run_id, {f"judge_{name}": float(c["value"]) for name, c in as_dict.get("checks", {}).items()
                                    if isinstance(c, Mapping) and isinstance(c.get("value"), (int, float))})
        path = home.runs_dir / f"judge-certificate-{run_id}.json"
        path.write_text(json.dumps(as_dict, indent=2, default=str), encoding="utf-8")
        mlflow.log_artifact(run_id, path, "certificate")
    mlflow.set_version_tags(model_name, version, {"genops.certificate_passed": cert.passed,
                                                  "genops.certificate_run_id": run_id})
    previous = mlflow.alias(model_name, CERTIFIED)
    if cert.passed:
        mlflow.set_alias(model_name, CERTIFIED, version)
    return cert, as_dict, run_id, previous


def judge_adapter(
    context: dg.AssetExecutionContext,
    config: JudgeTuningConfig,
    base_model: dict,
    task: TaskRef,
    warehouse: DuckDBWarehouse,
    mlflow: MlflowTracking,
    judge: JudgeResource,
    home: GenopsHome,
) -> dg.Output[dict]:
    """A LoRA judge on the base model, tuned on people's choices (human_judgements, split train)
    and objective probe pairs built from the SFT train split (never golden items: they certify
    it), each pair rendered with the task's pairwise rubric in both orders with the target
    letter swapped. Registered as a version of MLflow model `genops-<task>-judge` (same inputs ->
    same version key -> reused), then certified on held-out human labels (split certify) and
    golden probes; only a passing certificate moves alias `certified`, which makes it the task's
    judge (`<task>:judge` on the local judge server). Cost: minutes of training on CPU, plus
    the certificate (about two minutes)."""
    from genops_assets.lib.judge_tuning import human_pairs, plan_judge_tuning, probe_training_pairs
    from genops_assets.lib.judging import BUILTIN_RUBRICS, load_rubrics

    spec = task.load()
    rubrics = load_rubrics(BUILTIN_RUBRICS, spec.root / "rubrics")
    if config.pairwise_rubric not in rubrics:
        raise dg.Failure(f"unknown rubric '{config.pairwise_rubric}'; available: {sorted(rubrics)}",
                         allow_retries=False)
    rubric = rubrics[config.pairwise_rubric]
    cfg = config.to_train_config()
    human, skipped = human_pairs(_mart(warehouse, spec.name, HUMAN_MART, "where split = 'train'", "item_id"))
    sft = _mart(warehouse, spec.name, "sft_dataset", "where split = 'train'")
    probes = probe_training_pairs(_examples(sft), spec, seed=config.seed, limit=config.probe_examples,
                                  show_reference=config.probe_reference)
    golden = _mart(warehouse, spec.name, "golden_eval_dataset")
    params = {**cfg.as_params(), "probe_examples": config.probe_examples, "probe_reference": config.probe_reference,
              "validation_fraction": config.validation_fraction}
    plan = plan_judge_tuning(rubric, human, probes, golden["input_text"].tolist(),
                             spec.splits.near_duplicate_jaccard, base_model["folder_digest"], params,
                             JUDGE_CODE_VERSION, config.validation_fraction, config.max_train_examples)
    context.log.info(f"judge training pairs: {plan.counts} (left out: {skipped or 'none'})")

    model_name = judge_model_name(spec.name)
    existing = mlflow.find_version(model_name, plan.version_key)
    if existing is not None and ASSET_VALUE_TAG in existing.tags:
        value = json.loads(existing.tags[ASSET_VALUE_TAG])
        context.log.info(f"{model_name} v{existing.version} already has version key {plan.version_key}: "
                         "not training again")
    else:
        value = _train_and_register(context, spec, cfg, plan, base_model, config, mlflow, home)
    version = str(value["version"])

    cert, certificate, cert_run_id, previous = _certify(context, spec, rubric, version, base_model, config,
                                                        warehouse, judge, mlflow, home)
    certified = mlflow.alias(model_name, CERTIFIED)
    missed = _missed_by(certificate)
    if cert.passed:
        context.log.info(f"{model_name} v{version} passed its certificate: alias {CERTIFIED} -> v{version}, "
                         f"served as {judge_name(spec.name)}")
    else:
        context.log.warning(f"{model_name} v{version} did not pass its certificate ({'; '.join(cert.failures)}); "
                            f"alias {CERTIFIED} stays at "
                            f"{'v' + previous.version if previous else 'no version (the configured judge judges)'}")
    value = {**value, "reused": existing is not None, "certified": bool(cert.passed), "certificate": certificate,
             "certificate_run_id": cert_run_id, "certified_version": certified.version if certified else None,
             "judge_model": judge_name(spec.name, version), "rubric": f"{rubric.name}@{rubric.version}"}
    return dg.Output(value, metadata={
        "model": model_name,
        "version": version,
        "version_key": plan.version_key,
        "reused": existing is not None,
        "certified": bool(cert.passed),
        "certified_version": certified.version if certified else "none",
        "previous_certified_version": previous.version if previous else "none",
        "failures": dg.MetadataValue.json(list(cert.failures)),
        "missed_by": dg.MetadataValue.json(missed),
        "labels_needed": NOT_COMPUTED if cert.labels_needed is None else cert.labels_needed,
        "certificate": dg.MetadataValue.json(certificate),
        "pairs": dg.MetadataValue.json(plan.counts),
        "left_out_choices": dg.MetadataValue.json(skipped),
        "steps": value["steps"],
        "final_train_loss": NOT_COMPUTED if value["final_train_loss"] is None else value["final_train_loss"],
        "final_eval_loss": NOT_COMPUTED if value["final_eval_loss"] is None else value["final_eval_loss"],
        "adapter_sha256": value["adapter_digest"],
        "mlflow_run_id": value["run_id"],
        "certificate_run_id": cert_run_id,
        "model_uri": f"models:/{model_name}/{version}",
    })


def build_judge_tuning_assets(task: TaskRef) -> list[dg.AssetsDefinition]:
    return [dg.asset(
        key_prefix=[task.name],
        group_name=task_group(task, "judge_tuning"),
        deps=[task_key(task, name) for name in (HUMAN_MART, "sft_dataset", "golden_eval_dataset")],
        kinds={"pytorch", "mlflow"},
        code_version=JUDGE_CODE_VERSION,
        pool="training",
        retry_policy=TRAINING_RETRY_POLICY,
    )(bind_task(judge_adapter, task))]
