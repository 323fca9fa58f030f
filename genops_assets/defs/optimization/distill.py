"""The distilled student: a smaller model trained on the tuned teacher's answers, registered as
variant ``distilled``."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from genops_assets import __version__
from genops_assets.components.binding import bind_task, task_group, task_ins, task_key
from genops_assets.defs.tuning.assets import NOT_COMPUTED, progress_logger
from genops_assets.lib.cache import CallCache
from genops_assets.lib.distill import (
    DISTILL_CODE_VERSION,
    EndpointTeacher,
    EngineTeacher,
    UnlabelledPrompt,
    agreement,
    default_keep,
    generation_speed,
    prune_layers,
    student_config,
    teacher_labels,
    train_student,
    unique_prompts,
)
from genops_assets.lib.evaluation import examples_from_frame
from genops_assets.lib.formatting import build_messages
from genops_assets.lib.hashing import sha256_dir, sha256_json
from genops_assets.lib.integrity import MANIFEST, verify_folder
from genops_assets.lib.locks import exclusive
from genops_assets.lib.tasks import TaskRef, read_raw_file
from genops_assets.lib.tuning import ProgressLine, tracked_metrics
from resources.feedback_store import FeedbackStore, RequestQuery
from resources.paths import GenopsHome
from resources.tracking import VERSION_KEY_TAG, MlflowTracking, registered_model_name
from resources.warehouse import DuckDBWarehouse, mart_schema

CODE_VERSION = f"genops-{__version__}/{DISTILL_CODE_VERSION}"
VARIANT = "distilled"
TRAINING_LOCK = "training.lock"  # the lock tuned_adapter holds: one training at a time
SPEED_PROMPTS = 8


class DistillConfig(dg.Config):
    student_base: str | None = Field(None, description="A smaller model folder of the base's family to train as "
                                     "the student (GPU setups); empty: a layer-pruned copy of the base model.")
    student_layers: int | None = Field(None, description="Layers the pruned student keeps; empty: the task's "
                                       "optimization.student_layers, else two thirds of the base's.")
    student_steps: int | None = Field(None, description="Training steps; empty: the task's "
                                      "optimization.student_steps, else 200.")
    teacher_base_url: str | None = Field(None, description="An OpenAI-compatible endpoint that labels the prompts "
                                         "instead of the tuned adapter on the genops engine in this process.")
    teacher_model: str | None = Field(None, description="The model name to ask at teacher_base_url.")
    teacher_api_key: str | None = Field(None, description="The endpoint's API key: give it as {env: VARIABLE} in "
                                     "the run config, so the key itself never appears there.")
    max_prompts: int | None = Field(None, description="Cap on the prompts labelled (the first ones: SFT inputs, "
                                    "then incoming files, then logged requests).")
    batch_size: int = Field(8, description="Conversations per generation batch (labels, golden answers).")


def _setting(spec, name: str, override: Any, default: Any) -> Any:
    """A run config override, else the task's ``optimization.<name>``, else ``default``."""
    if override is not None:
        return override
    value = getattr(getattr(spec, "optimization", None), name, None)
    return default if value is None else value


def _request_prompts(feedback_store: FeedbackStore, task: str) -> list[UnlabelledPrompt]:
    """Inputs of the endpoint's logged requests for ``task`` (its own and those naming no task)."""
    df = feedback_store.requests(RequestQuery(("request_id", "input_text"), task=task, requests_only=True,
                                              not_null=("input_text",), non_blank=("input_text",)))
    return [UnlabelledPrompt(f"request:{r.request_id}", str(r.input_text)) for r in df.itertuples()]


def collect_prompts(spec, warehouse: DuckDBWarehouse, feedback_store: FeedbackStore,
                    golden_inputs: set[str]) -> tuple[list[UnlabelledPrompt], dict]:
    """The unlabelled prompts: the SFT mart's inputs (labels not used), the inputs of the task's
    ``incoming/`` files and of logged requests; repeats and golden-set inputs left out (the golden
    set measures the student). Returns the prompts and a count per source."""
    sft = warehouse.query_df(f"select * from {mart_schema(spec.name)}.sft_dataset order by example_id")
    sources = {"sft": [UnlabelledPrompt(f"sft:{e.example_id}", e.input_text, e.contexts)
                       for e in examples_from_frame(sft)]}
    incoming = []
    if spec.incoming_dir.is_dir():
        for path in sorted(p for p in spec.incoming_dir.iterdir() if p.suffix in (".jsonl", ".csv")):
            incoming += [UnlabelledPrompt(f"incoming:{ex.source_file}:{ex.source_row}", ex.input_text,
                                          ex.contexts or ()) for ex in read_raw_file(path, spec)]
    sources["incoming"] = incoming
    # A logged request holds the question only, not the passages a retrieval task needs.
    sources["requests"] = [] if spec.contexts is not None else _request_prompts(feedback_store, spec.name)
    everything = unique_prompts(p for group in sources.values() for p in group)
    kept = [p for p in everything if p.input_text.strip() not in golden_inputs]
    counts = {f"prompts_{k}": len(v) for k, v in sources.items()}
    counts |= {"prompts_unique": len(everything), "prompts_golden_excluded": len(everything) - len(kept)}
    return kept, counts


def _teacher(config: DistillConfig, base_model: dict, tuned_adapter: dict):
    if config.teacher_base_url:
        if not config.teacher_model:
            raise dg.Failure("teacher_base_url is set but teacher_model is not: name the model to ask",
                             allow_retries=False)
        return EndpointTeacher(config.teacher_base_url, config.teacher_model, config.teacher_api_key or "")
    return _original(base_model, tuned_adapter, config.batch_size)


def _original(base_model: dict, tuned_adapter: dict, batch_size: int) -> EngineTeacher:
    """The tuned adapter on the base model, on the genops engine in this process."""
    return EngineTeacher(base_model["path"], tuned_adapter["adapter_dir"], base_model["folder_digest"],
                         tuned_adapter["adapter_digest"], batch_size)


def _variant_files(path: Path, parent: str | None):
    """The student's files as the registry's VariantFiles."""
    from genops_assets.lib.variants import VariantFiles

    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return VariantFiles(name=VARIANT, path=str(path), format="safetensors", engine="local", parent=parent,
                        size_bytes=size, digest=sha256_dir(path))


def _label_progress(context: dg.AssetExecutionContext, stage: str):
    """A ``teacher_labels`` progress callback: answered/total and an ETA from the teacher's rate."""
    started = time.monotonic()
    first: list[int] = []

    def on_progress(done: int, total: int) -> None:
        # The first report counts the cached answers too; the rate is that of the teacher's batches.
        if not first:
            first.append(done)
            context.log.info(f"distill {stage}: {done}/{total} answered")
            return
        rate = (done - first[0]) / max(time.monotonic() - started, 1e-9)
        eta = int((total - done) / rate) if rate > 0 else 0
        context.log.info(f"distill {stage}: {done}/{total} answered, ETA {eta // 60}m{eta % 60:02d}s")

    return on_progress


def _build_student(context, mlflow: MlflowTracking, run_id: str, home: GenopsHome, examples, cfg, out_dir: Path,
                   version_key: str, student_base: Path | None, pruned_dir: Path, source: str,
                   keep: int) -> dict[str, Any]:
    """Train the student into ``out_dir`` (the pruned base, or ``student_base`` as it is), or
    reuse the one a run with the same version key left there. Returns the training summary."""
    if out_dir.is_dir() and (out_dir / MANIFEST).is_file():
        verify_folder(out_dir)
        context.log.info(f"{out_dir} already holds the student of version key {version_key}: not training again")
        return {"reused": True}
    if student_base is not None:
        pruned_dir = student_base
    elif not pruned_dir.is_dir():
        pruned = prune_layers(source, keep, pruned_dir)
        context.log.info(f"pruned {pruned.source_layers} -> {len(pruned.kept_layers)} layers: {pruned.kept_layers}")
    on_progress = progress_logger(context, mlflow, run_id, tracked_metrics, ProgressLine(label="distill"))
    with exclusive(home.runs_dir / TRAINING_LOCK, on_wait=context.log.warning):
        result = train_student(pruned_dir, examples, [], cfg, out_dir, home.runs_dir / f"distill-{version_key}",
                               on_progress, data_digest=version_key, on_message=context.log.info)
    history = result.train.history
    return {"reused": False, "steps": result.train.steps, "runtime_s": result.train.runtime_s,
            "final_train_loss": result.train.last("loss"),
            "first_train_loss": next((h["loss"] for h in history if "loss" in h), None)}


def distilled_student(
    context: dg.AssetExecutionContext,
    config: DistillConfig,
    base_model: dict,
    tuned_adapter: dict,
    task: TaskRef,
    warehouse: DuckDBWarehouse,
    feedback_store: FeedbackStore,
    mlflow: MlflowTracking,
    home: GenopsHome,
) -> dg.Output[dict]:
    """A student model trained on the tuned teacher's answers to unlabelled prompts (the SFT
    inputs, incoming files and logged requests), registered as variant ``distilled`` of
    ``genops-<task>-variants``. The student is a layer-pruned copy of the base (or
    ``student_base``) with the LoRA it learnt merged in: a safetensors model folder. Measured on
    the golden set: field exact match of student vs teacher, both vs the references, and the
    student's generation speed against the teacher's on the genops engine. Teacher answers are
    cached; the same inputs reuse the student already trained. Cost: the teacher's generation
    over the prompts (once) and minutes of training on CPU."""
    spec = task.load()
    prompt_ref = mlflow.resolve_prompt(spec)
    golden = examples_from_frame(warehouse.query_df(
        f"select * from {mart_schema(spec.name)}.golden_eval_dataset order by example_id"))
    if not golden:
        raise dg.Failure("golden_eval_dataset is empty: the student cannot be compared to the teacher",
                         allow_retries=False)
    prompts, prompt_counts = collect_prompts(spec, warehouse, feedback_store, {e.input_text.strip() for e in golden})
    if config.max_prompts:
        prompts = prompts[: config.max_prompts]
    if not prompts:
        raise dg.Failure(f"no unlabelled prompts for task '{spec.name}' (sft_dataset, incoming/, request log)",
                         allow_retries=False)
    teacher = _teacher(config, base_model, tuned_adapter)
    student_source = config.student_base or base_model["path"]
    source_layers = json.loads(Path(student_source, "config.json").read_text(encoding="utf-8"))["num_hidden_layers"]
    keep = source_layers if config.student_base else int(_setting(spec, "student_layers", config.student_layers,
                                                                  default_keep(source_layers)))
    steps = int(_setting(spec, "student_steps", config.student_steps, 200))
    cfg = student_config(steps)
    calls = CallCache(home.cache_dir / "calls.sqlite")

    labels = teacher_labels(prompts, spec, teacher, calls, prompt_ref.template, batch_size=config.batch_size,
                            on_progress=_label_progress(context, "labels"))
    golden_prompts = [UnlabelledPrompt(e.example_id, e.input_text, e.contexts) for e in golden]
    golden_teacher = teacher_labels(golden_prompts, spec, teacher, calls, prompt_ref.template,
                                    batch_size=config.batch_size, on_progress=_label_progress(context, "golden"))
    if not labels.examples:
        raise dg.Failure(f"the teacher gave no valid answer to {len(prompts)} prompts "
                         f"(first problems: {labels.invalid[:3]})", allow_retries=False)
    context.log.info(f"teacher labels: {labels.counts()}")

    source_digest = sha256_dir(student_source) if config.student_base else base_model["folder_digest"]
    version_key = sha256_json({
        "teacher": teacher.identity, "student_source": source_digest, "keep": keep,
        "labels": [[e.example_id, e.messages, e.target] for e in labels.examples], "config": cfg.as_params(),
        "code": CODE_VERSION})[:32]
    variants_root = home.models_dir / "variants" / spec.name
    out_dir = variants_root / f"{VARIANT}-{version_key}"
    tags = {"genops.task": spec.name, "genops.variant": VARIANT, "genops.dagster_run_id": context.run.run_id,
            "genops.code_version": CODE_VERSION, VERSION_KEY_TAG: version_key}
    with mlflow.run(f"genops/{spec.name}", f"distill-{version_key[:8]}", tags) as run_id:
        mlflow.log_params(run_id, {
            **{f"lora_{k}": v for k, v in cfg.as_params().items()}, "method": "lora_merged",
            "student_source": student_source, "source_layers": source_layers,
            "layers_kept": keep, "steps": steps,
            "teacher": json.dumps(teacher.identity, sort_keys=True), "teacher_version": str(tuned_adapter["version"]),
            "prompt_version": prompt_ref.version, **prompt_counts, **labels.counts()})
        train_summary = _build_student(context, mlflow, run_id, home, labels.examples, cfg, out_dir, version_key,
                                       Path(config.student_base) if config.student_base else None,
                                       variants_root / f"pruned-{sha256_json([source_digest, keep])[:16]}",
                                       student_source, keep)
        comparison = compare_on_golden(context, spec, prompt_ref.template, golden, golden_teacher, teacher,
                                       _original(base_model, tuned_adapter, config.batch_size), out_dir,
                                       config.batch_size)
        mlflow.log_metrics(run_id, {k: float(v) for k, v in {**comparison, **train_summary}.items()
                                    if isinstance(v, float | int) and not isinstance(v, bool) and math.isfinite(v)})
        files = _variant_files(out_dir, parent=None)
        mv = mlflow.register_variant(spec.name, files, run_id, source_version=str(tuned_adapter["version"]),
                                     version_key=version_key,
                                     extra_tags={"genops.distill.layers_kept": str(keep),
                                                 "genops.distill.teacher": json.dumps(teacher.identity, sort_keys=True),
                                                 "genops.distill.student_vs_teacher":
                                                     str(comparison["student_vs_teacher_mean_field_exact_match"])})
    value = {"variants": [{**files.__dict__, "version": mv.version}], "mlflow_run_id": run_id,
             "version_key": version_key, "source_model": registered_model_name(spec.name),
             "source_version": str(tuned_adapter["version"]), **comparison, **prompt_counts, **labels.counts()}
    context.log.info(f"registered variant {VARIANT} v{mv.version}: student vs teacher "
                     f"{comparison['student_vs_teacher_mean_field_exact_match']:.3f}, "
                     f"speed-up {comparison['speedup']:.2f}x")
    return dg.Output(value, metadata={
        "version": mv.version, "version_key": version_key, "mlflow_run_id": run_id,
        "student_dir": dg.MetadataValue.path(str(out_dir)), "size_mb": round(files.size_bytes / 2**20, 1),
        "layers_kept": str(keep), "source_layers": source_layers, "steps": steps, **prompt_counts,
        **labels.counts(), "invalid_examples": dg.MetadataValue.json(labels.invalid[:20]),
        **{k: (NOT_COMPUTED if v is None else v) for k, v in {**comparison, **train_summary}.items()}})


def compare_on_golden(context, spec, template, golden, golden_teacher, teacher, original_engine: EngineTeacher,
                      student_dir: Path, batch_size: int) -> dict[str, float]:
    """Field exact match on the golden set: student vs teacher (over the golden inputs the teacher
    answered validly), student and teacher vs the references; tokens/s of the genops engine's
    ``generate`` for the student and the teacher on the first golden prompts."""
    from genops_assets.serving.adapters import load_model
    from genops_assets.serving.generation import generate

    messages = [build_messages(spec, e.input_text, prompt=template, contexts=e.contexts) for e in golden]
    references = {e.example_id: e.reference for e in golden}
    context.log.info(f"distill: the student answers {len(golden)} golden inputs")
    student = load_model(student_dir)
    answers = {e.example_id: r.text for e, r in zip(golden, generate(
        student, messages, max_new_tokens=spec.max_new_tokens, batch_size=batch_size), strict=True)}
    student_speed = _speed(student, None, messages, spec.max_new_tokens, batch_size)
    del student
    # The speed-up is against the original (base + tuned adapter) on the same engine, whatever
    # labelled the prompts.
    original = teacher if isinstance(teacher, EngineTeacher) else original_engine
    original_speed = _speed(original.loaded(), "teacher", messages, spec.max_new_tokens, batch_size)
    out: dict[str, float] = {
        "golden_examples": float(len(golden)),
        "golden_teacher_invalid": float(len(golden_teacher.invalid)),
        "student_tokens_per_s": student_speed.tokens_per_s,
        "original_tokens_per_s": original_speed.tokens_per_s,
        "speedup": student_speed.tokens_per_s / original_speed.tokens_per_s,
    }
    vs_teacher = agreement(spec, answers, golden_teacher.answers)
    out |= {f"student_vs_teacher_{k}": v for k, v in vs_teacher.items()}
    out |= {f"student_vs_reference_{k}": v for k, v in agreement(spec, answers, references).items()}
    out |= {f"teacher_vs_reference_{k}": v for k, v in agreement(spec, golden_teacher.texts, references).items()}
    return out


def _speed(loaded, adapter, messages, max_new_tokens: int, batch_size: int):
    """Tokens/s on the first SPEED_PROMPTS golden conversations, after one warm-up call."""
    generation_speed(loaded, messages[:1], adapter, max_new_tokens, batch_size)
    speed, _ = generation_speed(loaded, messages[:SPEED_PROMPTS], adapter, max_new_tokens, batch_size)
    return speed


def build_distill_assets(task: TaskRef) -> list[dg.AssetsDefinition]:
    return [dg.asset(
        key_prefix=[task.name],
        group_name=task_group(task, "optimization"),
        ins=task_ins(task, "tuned_adapter"),
        deps=[task_key(task, name) for name in ("sft_dataset", "golden_eval_dataset")],
        kinds={"pytorch", "mlflow", "safetensors"},
        code_version=CODE_VERSION,
        pool="training",
    )(bind_task(distilled_student, task))]

