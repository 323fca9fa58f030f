"""LoRA SFT of the base model on the sft_dataset mart, tracked and registered in MLflow."""

from collections.abc import Callable
from pathlib import Path

import dagster as dg

from genops_assets import __version__
from genops_assets.components.binding import bind_task, task_group, task_key
from genops_assets.defs.tuning.config import TuningConfig
from genops_assets.lib.hashing import sha256_json
from genops_assets.lib.integrity import files_digest, record_folder
from genops_assets.lib.locks import exclusive
from genops_assets.lib.quantization import QuantizationUnavailable, require_quantization
from genops_assets.lib.report import loss_curve_png, png_markdown
from genops_assets.lib.tasks import TaskRef
from genops_assets.lib.train_entry import TrainRequest, config_dict, write_examples
from genops_assets.lib.training import TRAINING_CODE_VERSION, TrainingInputError
from genops_assets.lib.tuning import (
    ProgressLine,
    TunedAdapter,
    TuningPlan,
    history_until,
    plan_tuning,
    to_sft_examples,
    tracked_metrics,
)
from genops_assets.serving.protocol import CHALLENGER
from resources.paths import GenopsHome
from resources.storage import Storage
from resources.tracking import (
    VERSION_KEY_TAG,
    MlflowTracking,
    integrity_tags,
    prompt_tags,
    registered_model_name,
)
from resources.trainer import Trainer
from resources.warehouse import DuckDBWarehouse, mart_schema

CODE_VERSION = f"genops-{__version__}/{TRAINING_CODE_VERSION}"
# Transient failures (preemption, OOM kill of a worker, a flaky MLflow store) are retried after
# 10 s, then 20 s; each attempt resumes from the last complete checkpoint of the same version key.
TRAINING_LOCK = "training.lock"  # in the runs folder: one training at a time on this machine
TRAINING_RETRY_POLICY = dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL)
NOT_COMPUTED = "not computed"


def reuse_registered(context: dg.AssetExecutionContext, mlflow: MlflowTracking, model_name: str,
                     version_key: str) -> dg.Output[dict] | None:
    """The output of the version already registered under ``version_key`` (alias `challenger`
    again), or None when there is none: the same inputs are never trained twice."""
    reused = mlflow.registered_value(model_name, version_key)
    if reused is None:
        return None
    existing, value = reused
    context.log.info(f"{model_name} v{existing.version} already has version key {version_key}: not training again")
    return dg.Output(value, metadata={"model": model_name, "version": existing.version, "reused": True,
                                      "version_key": version_key})


def progress_logger(context: dg.AssetExecutionContext, mlflow: MlflowTracking, run_id: str,
                    metrics: Callable[[dict[str, float]], dict[str, float]],
                    line: ProgressLine) -> Callable[[dict[str, float]], None]:
    """A training progress callback: each log record's metrics to the MLflow run at its step,
    a progress line to the Dagster log when one is due."""

    def on_progress(record: dict[str, float]) -> None:
        mlflow.log_metrics(run_id, metrics(record), step=int(record["step"]))
        text = line(record)
        if text:
            context.log.info(text)

    return on_progress


def training_request(spec, plan: TuningPlan, template, cfg, base_dir: str, adapter_dir: Path, work_dir: Path,
                     resume: bool) -> dict:
    """The request the training program gets: the splits written as JSON Lines into the work
    folder (where the program, in a process or a pod of its own, reads them) and the rest by value."""
    files = {split: write_examples(work_dir / "examples" / f"{split}.jsonl", to_sft_examples(spec, rows, template))
             for split, rows in (("train", plan.train), ("validation", plan.validation))}
    return TrainRequest(base_dir=str(base_dir), train_file=str(files["train"]),
                        validation_file=str(files["validation"]), config=config_dict(cfg),
                        adapter_dir=str(adapter_dir), work_dir=str(work_dir), data_digest=sha256_json(plan.digests),
                        resume=resume).to_dict()


def register_tuned(mlflow: MlflowTracking, run_id: str, model_name: str, version_key: str, adapter_dir: Path,
                   prompt_ref, base_model: dict, tags: dict[str, str], dataset_digests: dict[str, str], steps: int,
                   losses: tuple[float | None, float | None], description: str, extra: dict | None = None):
    """Log ``adapter_dir`` as the run's MLflow model (the adapter and prompt on the base model, by
    path and digest) and register it as a new version with alias `challenger`; the asset value
    (the adapter's, plus ``extra``) is recorded on the version for a re-run with the same key.
    Returns (adapter, MLflow model, version)."""
    adapter_files = record_folder(adapter_dir)  # checked against the manifest training wrote
    version_tags = {**tags, "genops.base_model_digest": base_model["folder_digest"],
                    **integrity_tags(adapter_files), VERSION_KEY_TAG: version_key}
    model = mlflow.log_version_model(run_id, adapter_dir, prompt_ref, base_model, version_tags)
    adapter = TunedAdapter(
        model_name=model_name, version_key=version_key, adapter_dir=str(adapter_dir),
        adapter_digest=files_digest(adapter_files), adapter_files=adapter_files, run_id=run_id,
        base_model_digest=base_model["folder_digest"], base_model_path=base_model["path"],
        dataset_digests=dataset_digests, prompt=prompt_ref.summary(), steps=steps,
        final_train_loss=losses[0], final_eval_loss=losses[1], model_id=model.model_id)
    mv = mlflow.register_adapter(model_name, model, version_key, tags=version_tags,
                                 value={**adapter.as_dict(), **(extra or {})}, description=description)
    return adapter, model, mv


def tuned_adapter(
    context: dg.AssetExecutionContext,
    config: TuningConfig,
    base_model: dict,
    task: TaskRef,
    warehouse: DuckDBWarehouse,
    mlflow: MlflowTracking,
    home: GenopsHome,
    storage: Storage,
    trainer: Trainer,
) -> dg.Output[dict]:
    """A LoRA adapter trained on the train split of sft_dataset (loss on answer tokens only),
    registered in MLflow with alias `challenger` as an MLflow model (a pyfunc of the adapter and
    prompt on the base model: `mlflow.pyfunc.load_model("models:/genops-<task>@champion")`
    answers as the endpoint does). Same base model, data, prompts and config ->
    same version key -> the registered version is reused, nothing is trained twice.
    Cost: minutes on CPU (about 5 s/step for the embedded model on 2 cores). Training runs out of
    the run process, through the `trainer` resource (a child process or a Kubernetes pod, under
    `accelerate launch` when a launcher is configured); its progress lines arrive in this step's
    log and its log records in the MLflow run as it trains. An interrupted run (retried by the
    retry policy, or re-launched) resumes from the last complete checkpoint in
    runs/<version_key>/checkpoints."""

    cfg = config.to_train_config()
    try:
        if trainer.trains_here:  # a pod checks its own device
            require_quantization(cfg.quantization, "tuning config quantization")
    except QuantizationUnavailable as exc:  # this machine cannot; a retry cannot either
        raise dg.Failure(str(exc), allow_retries=False) from exc
    spec = task.load()
    prompt_ref = mlflow.resolve_prompt(spec)
    sft_table = f"{mart_schema(spec.name)}.sft_dataset"
    params = {**cfg.as_params(), **trainer.key_params()}
    plan = plan_tuning(warehouse.query_df(f"select * from {sft_table} order by example_id"),
                       base_model["folder_digest"], prompt_ref.digest, params, CODE_VERSION,
                       config.max_train_examples)
    model_name = registered_model_name(spec.name)

    reused = reuse_registered(context, mlflow, model_name, plan.version_key)
    if reused is not None:
        return reused

    tags = {"genops.dagster_run_id": context.run.run_id, "genops.code_version": CODE_VERSION,
            **prompt_tags(prompt_ref)}
    with mlflow.run(f"genops/{spec.name}", f"sft-{plan.version_key[:8]}",
                    {**tags, "genops.task": spec.name, VERSION_KEY_TAG: plan.version_key}) as run_id:
        mlflow.link_prompt(run_id, prompt_ref)
        mlflow.log_params(run_id, {**params, "quantization": cfg.quantization, "trainer": type(trainer).__name__,
                                   "base_model": base_model["name"],
                                   "train_examples": len(plan.train), "validation_examples": len(plan.validation),
                                   "task": spec.name, "prompt_version": prompt_ref.version})
        for split, rows in (("train", plan.train), ("validation", plan.validation)):
            mlflow.log_dataset(run_id, rows[["example_id", "input_text", "output_json"]].reset_index(drop=True),
                               name=f"{spec.name}-sft-{split}", source=f"{warehouse.path}#{sft_table}",
                               digest=plan.digests[split], context="training" if split == "train" else "validation")

        adapter_dir = home.models_dir / "adapters" / plan.version_key
        request = training_request(spec, plan, prompt_ref.template, cfg, base_model["path"], adapter_dir,
                                   home.runs_dir / plan.version_key, config.resume)
        try:
            # The pool of one keeps trainings apart, except where Dagster's SQLite storage lets
            # two steps claim its one slot within the same milliseconds; one machine, one lock.
            with exclusive(home.runs_dir / TRAINING_LOCK, on_wait=context.log.warning):
                result = trainer.run(context, request, on_record=lambda record: mlflow.log_metrics(
                    run_id, tracked_metrics(record), step=int(record["step"])))
        except TrainingInputError as exc:
            # Bad data or foreign checkpoints: the same inputs would fail the same way again.
            raise dg.Failure(str(exc), allow_retries=False) from exc
        if result.resumed_from_step:
            # This MLflow run starts at the checkpoint; give it the curve up to there as well.
            for record in history_until(result.history, result.resumed_from_step):
                mlflow.log_metrics(run_id, tracked_metrics(record), step=int(record["step"]))
        curve = home.runs_dir / plan.version_key / "loss_curve.png"
        curve.write_bytes(loss_curve_png(result.history))
        mlflow.log_artifact(run_id, curve, "plots")
        digests = {"genops.train_digest": plan.digests["train"], "genops.validation_digest": plan.digests["validation"]}
        # The published copies (with their manifests) that steps on other nodes fetch and check:
        # the adapter, and the mart rows it was trained on, keyed by their digest.
        adapter_uri = storage.upload_dir(adapter_dir, f"adapters/{spec.name}/{plan.version_key}")
        dataset_uri = storage.upload_frames({"train": plan.train, "validation": plan.validation},
                                            f"datasets/{spec.name}/sft/{plan.digests['train'][:16]}-{plan.digests['validation'][:16]}")
        adapter, model, mv = register_tuned(
            mlflow, run_id, model_name, plan.version_key, adapter_dir, prompt_ref, base_model, {**tags, **digests},
            plan.digests, result.steps, (result.last("loss"), result.last("eval_loss")),
            f"LoRA r={cfg.rank} on {base_model['name']}, {result.steps} steps", {"adapter_uri": adapter_uri})
    context.log.info(f"registered {model_name} v{mv.version} (alias {CHALLENGER}), {result.steps} steps in "
                     f"{result.runtime_s:.0f}s")
    return dg.Output(
        {**adapter.as_dict(), "version": mv.version, "adapter_uri": adapter_uri},
        metadata={
            "model": model_name,
            "version": mv.version,
            "version_key": plan.version_key,
            "prompt_version": prompt_ref.version,
            "mlflow_run_id": run_id,
            "mlflow_model_id": model.model_id,
            "model_uri": f"models:/{model_name}/{mv.version}",
            "steps": result.steps,
            "resumed_from_step": result.resumed_from_step or 0,
            "train_examples": result.train_examples,
            "skipped_too_long": len(result.skipped_too_long),
            # No evaluation ran (eval_every=0) or no step logged: said so, never a made-up 0.0.
            "final_train_loss": NOT_COMPUTED if adapter.final_train_loss is None else adapter.final_train_loss,
            "final_eval_loss": NOT_COMPUTED if adapter.final_eval_loss is None else adapter.final_eval_loss,
            "runtime_s": round(result.runtime_s, 1),
            "trainer": type(trainer).__name__,
            "train_processes": trainer.num_processes,
            "adapter_dir": dg.MetadataValue.path(str(adapter_dir)),
            "adapter_sha256": adapter.adapter_digest,
            "adapter_uri": adapter_uri,
            "dataset_uri": dataset_uri,
            "loss_curve": dg.MetadataValue.md(png_markdown("loss", curve.read_bytes())),
        },
    )


def build_tuning_assets(task: TaskRef) -> list[dg.AssetsDefinition]:
    return [dg.asset(
        key_prefix=[task.name],
        group_name=task_group(task, "tuning"),
        # Golden and few-shot marts are upstream too: a failing gate on any mart stops training.
        deps=[task_key(task, name) for name in ("sft_dataset", "golden_eval_dataset", "few_shot_examples",
                                                "prompt_templates")],
        kinds={"pytorch", "mlflow"},
        code_version=CODE_VERSION,
        pool="training",
        retry_policy=TRAINING_RETRY_POLICY,
    )(bind_task(tuned_adapter, task))]
