"""Prompts as versioned artifacts: the registry asset and LLM-driven prompt enhancement."""

import functools
import json

import dagster as dg
from pydantic import Field

from genops_assets.components.binding import bind_task, task_group, task_ins
from genops_assets.lib.cache import CallCache
from genops_assets.lib.eval_report import adapter_on_base
from genops_assets.lib.evaluation import evaluate_model, examples_from_frame
from genops_assets.lib.hashing import atomic_write_text, sha256_json
from genops_assets.lib.jsonl import iter_jsonl
from genops_assets.lib.metrics import per_example
from genops_assets.lib.prompts import CANDIDATE, PRODUCTION, prompt_registry_name
from genops_assets.lib.report import png_markdown
from genops_assets.lib.stats import bootstrap_ci
from genops_assets.lib.tasks import TaskRef
from resources.judge import JudgeResource
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking, prompt_tags
from resources.warehouse import DuckDBWarehouse, mart_schema


class PromptTemplatesConfig(dg.Config):
    promote_file_version: bool = Field(False, description="Point `production` at the task folder's version "
                                       "right away. Off: a changed file becomes `candidate` and is promoted "
                                       "after evaluation (genops prompt promote), and rollbacks stick.")
    commit_message: str = Field("", description="Commit message of a new version (default: names the files).")


# Bumped when prompt_templates' logic changes: it is then stale and registered again.
PROMPT_TEMPLATES_CODE_VERSION = "prompt-templates-1"


def prompt_templates_version(template_digest: str, production, candidate) -> str:
    """Data version of prompt_templates: the task folder's prompt and the versions the
    `production` and `candidate` aliases point at (a promotion or rollback in the registry is
    new data for tuning and evaluation, as an edited file is)."""
    return sha256_json([template_digest, production and production.version, candidate and candidate.version])[:16]


def current_prompt_templates_version(spec, mlflow: MlflowTracking) -> str:
    """``prompt_templates_version`` of the task folder and the registry as they are now (read only)."""
    name = prompt_registry_name(spec.name)
    return prompt_templates_version(spec.prompt.digest, mlflow.prompt_alias(name, PRODUCTION, spec.input_field),
                                    mlflow.prompt_alias(name, CANDIDATE, spec.input_field))


def prompt_templates(context: dg.AssetExecutionContext, config: PromptTemplatesConfig, task: TaskRef,
                     mlflow: MlflowTracking) -> dg.Output[dict]:
    """The task folder's prompt (system and user templates, generation parameters) registered in
    MLflow's prompt registry: one immutable version per distinct text (same text, no new
    version), aliases `production` (set on first registration) and `candidate`. Tuning,
    evaluation and serving resolve the prompt by alias and record the version they used."""
    spec = task.load()
    name = prompt_registry_name(spec.name)
    template = spec.prompt
    files = ", ".join(spec.template_files.values())
    message = config.commit_message or f"task folder prompts ({files}), digest {template.digest[:12]}"
    ref, created = mlflow.register_prompt(name, template, message, tags={"genops.source": "task_folder",
                                                                         "genops.task": spec.name})
    context.log.info(f"{name}: file version is v{ref.version} ({'new' if created else 'already registered'})")
    production = mlflow.prompt_alias(name, PRODUCTION, spec.input_field)
    if production is None or (config.promote_file_version and production.version != ref.version):
        mlflow.set_prompt_alias(name, PRODUCTION, ref.version)
        context.log.info(f"{name}: alias {PRODUCTION} -> v{ref.version}")
    elif production.version != ref.version:
        current = mlflow.prompt_alias(name, CANDIDATE, spec.input_field)
        if created or current is None:
            mlflow.set_prompt_alias(name, CANDIDATE, ref.version)
            context.log.info(f"{name}: the task folder's prompt differs from production v{production.version}; "
                             f"alias {CANDIDATE} -> v{ref.version} (evaluate, then `genops prompt promote`)")
    production = mlflow.require_prompt_alias(name, PRODUCTION, spec.input_field)
    candidate = mlflow.prompt_alias(name, CANDIDATE, spec.input_field)
    versions = mlflow.prompt_versions(name, spec.input_field)
    value = {"name": name, "file_version": ref.version, "created": created,
             "production": production.summary(), "candidate": candidate.summary() if candidate else None,
             "versions": len(versions)}
    return dg.Output(value, metadata={
        "prompt": name,
        "file_version": ref.version,
        "new_version": created,
        "production_version": production.version,
        "candidate_version": candidate.version if candidate else "none",
        "versions": len(versions),
        "production_digest": production.digest,
        "production_template": dg.MetadataValue.md(f"```\n{production.template.text()}```"),
    }, data_version=dg.DataVersion(prompt_templates_version(template.digest, production, candidate)))


class PromptCandidatesConfig(dg.Config):
    n_candidates: int = Field(3, ge=1, le=12, description="Rewrites asked of the teacher LLM.")
    temperature: float = Field(0.8, ge=0.0, le=2.0, description="Sampling temperature of the teacher.")
    max_new_tokens: int = Field(160, description="Longest rewrite the teacher may write.")
    max_examples: int | None = Field(32, description="Validation examples each prompt is scored on (None: all).")
    target: str = Field("tuned", description="Model the prompt is optimised for: 'tuned' (the tuned adapter, "
                                             "what serves) or 'base' (prompting alone).")
    margin: float = Field(0.01, description="How much the lower bound of the best candidate's paired improvement "
                          "over production must clear (0.01: a real improvement, not a tie).")
    batch_size: int = Field(8)


def prompt_candidates(
    context: dg.AssetExecutionContext,
    config: PromptCandidatesConfig,
    prompt_templates: dict,
    eval_report: dict,
    tuned_adapter: dict,
    base_model: dict,
    task: TaskRef,
    warehouse: DuckDBWarehouse,
    judge: JudgeResource,
    mlflow: MlflowTracking,
    home: GenopsHome,
) -> dg.Output[dict]:
    """An LLM (the judge/teacher endpoint) rewrites the production prompt from the last
    evaluation's failures into N candidates; each valid one is registered and scored on the
    validation split (never the golden set). The best moves to alias `candidate` only when the
    lower bound of its paired improvement over production clears the margin. MLflow records
    which prompt version produced which scores. Cost: a few minutes with the local model."""
    from genops_assets.lib.enhance import failure_digest, propose_candidates, select_prompt
    from genops_assets.lib.report import candidate_scores_png, prompt_enhancement_markdown

    if config.target not in ("tuned", "base"):
        raise ValueError(f"target must be 'tuned' or 'base', got {config.target!r}")
    spec = task.load()
    production = mlflow.resolve_prompt(spec)
    name = production.name
    primary = spec.primary_metric

    schema = mart_schema(spec.name)
    validation = warehouse.query_df(f"select * from {schema}.sft_dataset where split = 'validation' "
                                    "order by example_id")
    examples = examples_from_frame(validation.head(config.max_examples) if config.max_examples else validation)
    golden_ids = set(warehouse.query_df(f"select example_id from {schema}.golden_eval_dataset")["example_id"])
    failures = failure_digest([row for _, row in iter_jsonl(eval_report["predictions_file"])
                               if row["model"].startswith("candidate")], spec.label_fields)

    tuned = config.target == "tuned"
    adapters = {"candidate": tuned_adapter["adapter_dir"]} if tuned else {}

    @functools.cache
    def model():
        from genops_assets.serving.adapters import load_model

        return load_model(base_model["path"], adapters)

    digest = (adapter_on_base(base_model["folder_digest"], tuned_adapter["adapter_digest"]) if tuned
              else base_model["folder_digest"])
    cache = CallCache(home.cache_dir / "calls.sqlite")

    def evaluate(template, label):
        return evaluate_model(model, "candidate" if tuned else None, label, digest, spec, examples, [], cache,
                              config.batch_size, context.log.info, prompt=template)

    teacher = judge.connect(base_model["path"], cache=cache)

    def complete(messages, seed):
        return teacher.complete(messages, max_tokens=config.max_new_tokens, temperature=config.temperature,
                                seed=seed, version=production.digest)

    run_tags = {"genops.dagster_run_id": context.run.run_id, **prompt_tags(production)}
    with mlflow.run(f"genops/{spec.name}", "prompt-enhancement", run_tags) as run_id:
        mlflow.link_prompt(run_id, production)
        candidates = propose_candidates(complete, production.template, failures, config.n_candidates,
                                        log=context.log.info)
        for candidate in candidates:
            if candidate.template is not None:
                ref, _ = mlflow.register_prompt(
                    name, candidate.template, f"enhancement ({candidate.mode}): {candidate.direction}",
                    tags={"genops.source": "enhancement", "genops.parent_version": str(production.version),
                          "genops.enhancement_run": run_id})
                candidate.version = ref.version
        selection = select_prompt(production.template, f"production v{production.version}", candidates, evaluate,
                                  [e.example_id for e in examples], golden_ids, primary, config.margin)
        if selection.promoted:
            mlflow.set_prompt_alias(name, CANDIDATE, selection.best.version)
            context.log.info(f"{name}: alias {CANDIDATE} -> v{selection.best.version} ({selection.gate.reason})")
        elif selection.gate is not None:
            context.log.info(f"no candidate promoted: {selection.gate.reason}")
        else:
            context.log.info("no usable candidate: every teacher answer was skipped")

        for candidate, evaluation in selection.evaluated:
            mlflow.set_prompt_tags(name, candidate.version, {
                f"genops.validation.{primary}": f"{evaluation.metrics[primary]:.4f}",
                "genops.validation.n": len(examples)})
        metrics = {f"production.{k}": v for k, v in selection.production.metrics.items()}
        for candidate, evaluation in selection.evaluated:
            metrics.update({f"v{candidate.version}.{k}": v for k, v in evaluation.metrics.items()})
        mlflow.log_metrics(run_id, metrics)
        mlflow.log_params(run_id, {"production_version": production.version, "n_candidates": config.n_candidates,
                                   "target": config.target, "selection_split": "validation",
                                   "selection_examples": len(examples), "margin": config.margin,
                                   "teacher": f"{teacher.base_url} {teacher.model}",
                                   "temperature": config.temperature})
        bars = [(f"production v{production.version}", bootstrap_ci(per_example(selection.production.scores, primary)))]
        bars += [(f"v{candidate.version}", bootstrap_ci(per_example(evaluation.scores, primary)))
                 for candidate, evaluation in selection.evaluated]
        chart = candidate_scores_png(bars, primary)
        verdict = selection.gate.reason if selection.gate else "no usable candidate"
        report = functools.partial(prompt_enhancement_markdown, f"production v{production.version}",
                                   selection.production.metrics[primary], candidates, primary, config.target,
                                   len(examples), selection.promoted, verdict)
        records = [c.as_dict() for c in candidates]
        out_dir = home.runs_dir / "prompts" / run_id
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "candidates.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        atomic_write_text(out_dir / "selection_examples.json", json.dumps([e.example_id for e in examples]))
        (out_dir / "candidates.png").write_bytes(chart)
        atomic_write_text(out_dir / "report.md", report())
        mlflow.log_artifacts(run_id, out_dir, "prompt_enhancement")

    value = {
        "production_version": production.version,
        "candidates": records,
        "best_version": selection.best.version if selection.best else None,
        "promoted": selection.promoted,
        "gate": selection.gate.as_dict() if selection.gate else None,
        "selection_example_ids": [e.example_id for e in examples],
        "mlflow_run_id": run_id,
        "teacher_usage": teacher.usage.as_dict(),
    }
    return dg.Output(value, metadata={
        "report": dg.MetadataValue.md(report(chart=png_markdown("candidates", chart))),
        "mlflow_run_id": run_id,
        "production_version": production.version,
        "usable_candidates": len(selection.evaluated),
        "skipped_candidates": sum(1 for c in candidates if c.skip_reason),
        "promoted": selection.promoted,
        "best_version": selection.best.version if selection.best else "none",
        "gate": verdict,
        f"production_{primary}": float(selection.production.metrics[primary]),
        "teacher_calls": teacher.usage.as_dict().get("calls", 0),
    })


def build_prompt_assets(task: TaskRef) -> list[dg.AssetsDefinition]:
    group = task_group(task, "prompts")
    return [
        dg.asset(key_prefix=[task.name], group_name=group, kinds={"mlflow"},
                 code_version=PROMPT_TEMPLATES_CODE_VERSION)(bind_task(prompt_templates, task)),
        dg.asset(key_prefix=[task.name], group_name=group, kinds={"mlflow"},
                 ins=task_ins(task, "prompt_templates", "eval_report", "tuned_adapter"))(
            bind_task(prompt_candidates, task)),
    ]
