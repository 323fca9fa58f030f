"""LoRA SFT of the base model on the sft_dataset mart, tracked and registered in MLflow."""


import json
import time

import dagster as dg

from genops_assets import __version__
from genops_assets.defs.tuning.config import TuningConfig
from genops_assets.lib.evaluation import examples_from_frame
from genops_assets.lib.formatting import build_messages, format_target
from genops_assets.lib.hashing import file_digests, sha256_json
from genops_assets.lib.locks import exclusive
from genops_assets.lib.report import loss_curve_png
from genops_assets.lib.training import TRAINING_CODE_VERSION, SftExample, TrainingInputError, train_lora
from genops_assets.serving.protocol import CHALLENGER
from resources.paths import GenopsHome
from resources.task import TaskResource
from resources.tracking import VERSION_KEY_TAG, MlflowTracking, prompt_tags, registered_model_name
from resources.warehouse import MART_SCHEMA, DuckDBWarehouse

CODE_VERSION = f"genops-{__version__}/{TRAINING_CODE_VERSION}"
# Transient failures (preemption, OOM kill of a worker, a flaky MLflow store) are retried after
# 10 s, then 20 s; each attempt resumes from the last complete checkpoint of the same version key.
TRAINING_LOCK = "training.lock"  # in the runs folder: one training at a time on this machine
TRAINING_RETRY_POLICY = dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL)


def frame_digest(df) -> str:
    cols = ["example_id", "input_text", "output_json"]
    # The passages are part of what is trained on; a task without them keeps its digests.
    if "contexts_json" in df.columns and df["contexts_json"].notna().any():
        cols += ["contexts_json", "reference_contexts_json"]
    return sha256_json(df[cols].to_dict(orient="records"))


def to_sft_examples(spec, df, prompt=None) -> list[SftExample]:
    return [
        SftExample(ex.example_id, build_messages(spec, ex.input_text, prompt=prompt, contexts=ex.contexts),
                   format_target(ex.reference, spec.output_fields))
        for ex in examples_from_frame(df)
    ]


@dg.asset(
    group_name="tuning",
    # Golden and few-shot marts are upstream too: a failing gate on any mart stops training.
    deps=[dg.AssetKey("sft_dataset"), dg.AssetKey("golden_eval_dataset"), dg.AssetKey("few_shot_examples"),
          dg.AssetKey("prompt_templates")],
    kinds={"pytorch", "mlflow"},
    code_version=CODE_VERSION,
    pool="training",
    retry_policy=TRAINING_RETRY_POLICY,
)
def tuned_adapter(
    context: dg.AssetExecutionContext,
    config: TuningConfig,
    base_model: dict,
    task: TaskResource,
    warehouse: DuckDBWarehouse,
    mlflow: MlflowTracking,
    home: GenopsHome,
) -> dg.Output[dict]:
    """A LoRA adapter trained on the train split of sft_dataset (loss on answer tokens only),
    registered in MLflow with alias `challenger`. Same base model, data, prompts and config ->
    same version key -> the registered version is reused, nothing is trained twice.
    Cost: minutes on CPU (about 5 s/step for the embedded model on 2 cores). An interrupted run
    (retried by the retry policy, or re-launched) resumes from the last complete checkpoint in
    runs/<version_key>/checkpoints."""

    spec = task.load()
    prompt_ref = mlflow.resolve_prompt(spec)
    prompt = prompt_ref.template
    df = warehouse.query_df(f"select * from {MART_SCHEMA}.sft_dataset order by example_id")
    train_df = df[df["split"] == "train"]
    val_df = df[df["split"] == "validation"]
    if config.max_train_examples:
        train_df = train_df.head(config.max_train_examples)
        val_df = val_df.head(max(2, config.max_train_examples // 4))
    cfg = config.to_train_config()
    digests = {
        "base_model": base_model["folder_digest"],
        "train": frame_digest(train_df),
        "validation": frame_digest(val_df),
        "prompt": prompt_ref.digest,
    }
    version_key = sha256_json({**digests, "config": cfg.as_params(), "code": CODE_VERSION})[:32]
    model_name = registered_model_name(spec.name)

    existing = mlflow.find_version(model_name, version_key)
    if existing is not None:
        context.log.info(f"{model_name} v{existing.version} already has version key {version_key}: not training again")
        mlflow.set_alias(model_name, CHALLENGER, existing.version)
        value = json.loads(existing.tags["genops.asset_value"])
        return dg.Output(value, metadata={"model": model_name, "version": existing.version, "reused": True,
                                          "version_key": version_key})

    run_id = mlflow.start_run(
        f"genops/{spec.name}",
        f"sft-{version_key[:8]}",
        tags={"genops.dagster_run_id": context.run.run_id, "genops.task": spec.name,
              "genops.code_version": CODE_VERSION, VERSION_KEY_TAG: version_key, **prompt_tags(prompt_ref)},
    )
    mlflow.link_prompt(run_id, prompt_ref)
    try:
        mlflow.log_params(run_id, {**cfg.as_params(), "base_model": base_model["name"], "train_examples": len(train_df),
                           "validation_examples": len(val_df), "task": spec.name,
                           "prompt_version": prompt_ref.version})
        for name, part in (("train", train_df), ("validation", val_df)):
            mlflow.log_dataset(run_id, part[["example_id", "input_text", "output_json"]].reset_index(drop=True),
                               name=f"{spec.name}-sft-{name}", source=f"{warehouse.path}#{MART_SCHEMA}.sft_dataset",
                               digest=digests[name], context="training" if name == "train" else "validation")

        last_log = [0.0]

        def on_progress(rec: dict[str, float]) -> None:
            step, total = int(rec["step"]), int(rec["total_steps"])
            metrics = {k: rec[k] for k in ("loss", "eval_loss", "learning_rate", "grad_norm") if k in rec}
            mlflow.log_metrics(run_id, {("train_loss" if k == "loss" else k): v for k, v in metrics.items()}, step=step)
            if time.monotonic() - last_log[0] > 2 or "eval_loss" in rec or step == total:
                last_log[0] = time.monotonic()
                eta = rec.get("eta_s")
                parts = [f"step {step}/{total}"] + [f"{k} {v:.4f}" for k, v in metrics.items() if k != "learning_rate"]
                if eta is not None:
                    parts.append(f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s")
                context.log.info("tuning: " + ", ".join(parts))

        adapter_dir = home.models_dir / "adapters" / version_key
        try:
            # The pool of one keeps trainings apart, except where Dagster's SQLite storage lets
            # two steps claim its one slot within the same milliseconds; one machine, one lock.
            with exclusive(home.runs_dir / TRAINING_LOCK, on_wait=context.log.warning):
                result = train_lora(
                    base_model["path"], to_sft_examples(spec, train_df, prompt),
                    to_sft_examples(spec, val_df, prompt), cfg, adapter_dir=adapter_dir,
                    work_dir=home.runs_dir / version_key, on_progress=on_progress, data_digest=sha256_json(digests),
                    resume=config.resume, on_message=context.log.info,
                )
        except TrainingInputError as exc:
            # Bad data or foreign checkpoints: the same inputs would fail the same way again.
            raise dg.Failure(str(exc), allow_retries=False) from exc
        if result.resumed_from_step:
            # This MLflow run starts at the checkpoint; give it the curve up to there as well.
            for rec in result.history:
                if rec["step"] <= result.resumed_from_step:
                    mlflow.log_metrics(run_id, {("train_loss" if k == "loss" else k): rec[k] for k in
                                                ("loss", "eval_loss", "learning_rate", "grad_norm") if k in rec},
                                       step=int(rec["step"]))
        curve = home.runs_dir / version_key / "loss_curve.png"
        curve.write_bytes(loss_curve_png(result.history))
        mlflow.log_artifact(run_id, curve, "plots")
        mlflow.log_artifacts(run_id, adapter_dir, "adapter")
        adapter_digests = file_digests(adapter_dir)
        value = {
            "model_name": model_name,
            "version_key": version_key,
            "adapter_dir": str(adapter_dir),
            "adapter_digest": sha256_json(adapter_digests),
            "adapter_files": adapter_digests,
            "run_id": run_id,
            "base_model_digest": base_model["folder_digest"],
            "base_model_path": base_model["path"],
            "dataset_digests": digests,
            "prompt": prompt_ref.summary(),
            "steps": result.steps,
            "final_train_loss": result.last("loss"),
            "final_eval_loss": result.last("eval_loss"),
        }
        mv = mlflow.register(
            model_name,
            source=mlflow.artifact_uri(run_id, "adapter"),
            run_id=run_id,
            tags={
                VERSION_KEY_TAG: version_key,
                "genops.base_model_digest": base_model["folder_digest"],
                "genops.train_digest": digests["train"],
                "genops.validation_digest": digests["validation"],
                **prompt_tags(prompt_ref),
                "genops.adapter_digest": value["adapter_digest"],
                "genops.dagster_run_id": context.run.run_id,
                "genops.code_version": CODE_VERSION,
            },
            description=f"LoRA r={cfg.rank} on {base_model['name']}, {result.steps} steps",
        )
        value["version"] = mv.version
        mlflow.set_version_tags(model_name, mv.version, {"genops.asset_value": json.dumps(value)})
        mlflow.set_alias(model_name, CHALLENGER, mv.version)
        mlflow.end_run(run_id)
    except BaseException:
        mlflow.end_run(run_id, status="FAILED")
        raise
    context.log.info(f"registered {model_name} v{mv.version} (alias {CHALLENGER}), {result.steps} steps in {result.runtime_s:.0f}s")
    return dg.Output(
        value,
        metadata={
            "model": model_name,
            "version": mv.version,
            "version_key": version_key,
            "prompt_version": prompt_ref.version,
            "mlflow_run_id": run_id,
            "steps": result.steps,
            "resumed_from_step": result.resumed_from_step or 0,
            "train_examples": result.train_examples,
            "skipped_too_long": len(result.skipped_too_long),
            "final_train_loss": result.last("loss") or 0.0,
            "final_eval_loss": result.last("eval_loss") or 0.0,
            "runtime_s": round(result.runtime_s, 1),
            "adapter_dir": dg.MetadataValue.path(str(adapter_dir)),
            "adapter_sha256": value["adapter_digest"],
            "loss_curve": dg.MetadataValue.md(
                "![loss](data:image/png;base64," + __import__("base64").b64encode(curve.read_bytes()).decode() + ")"
            ),
        },
    )
