"""Golden-set evaluation of base model, candidate adapter and current champion, with a report."""


import functools

import dagster as dg

from genops_assets.components.binding import bind_task, task_group, task_ins, task_key
from genops_assets.defs.evaluation.config import EvalConfig
from genops_assets.lib.cache import CallCache
from genops_assets.lib.eval_report import (
    SUMMARY_METRICS,
    GoldenSetup,
    RegisteredAdapter,
    compare_decoding,
    compare_prompt,
    evaluate_golden,
    metric_names,
    parity_examples,
    promotion_gate,
    rag_mlflow_metrics,
    rouge_l_summary,
    sample_predictions,
    select_few_shots,
    write_predictions,
)
from genops_assets.lib.evaluation import ModelEval, examples_from_frame, sample_pass_rates
from genops_assets.lib.hashing import sha256_json
from genops_assets.lib.prompts import CANDIDATE
from genops_assets.lib.quantization import quantized_identity, require_quantization
from genops_assets.lib.report import png_markdown, rag_section, write_eval_report
from genops_assets.lib.tasks import TaskRef
from resources.judge import JudgeResource
from resources.paths import GenopsHome
from resources.storage import Storage
from resources.tracking import CHAMPION, PREVIOUS_CHAMPION_TAG, MlflowTracking, prompt_tags
from resources.warehouse import DuckDBWarehouse, mart_schema


def gate_reference(mlflow: MlflowTracking, home: GenopsHome, model_name: str, version: str) -> RegisteredAdapter | None:
    """The registered adapter the candidate is gated against: the champion; when the candidate
    already is the champion (a re-run), the champion it replaced, so that the model is never
    compared with itself; None when there is neither (the base model is the baseline)."""
    champion = mlflow.alias(model_name, CHAMPION)
    if champion is None:
        return None
    role, reference = "champion", champion
    if champion.version == version:
        previous = champion.tags.get(PREVIOUS_CHAMPION_TAG)
        if not previous:
            return None
        role, reference = "previous champion", mlflow.get_version(model_name, previous)
    adapter_dir = mlflow.fetch_registered_adapter(home.registry_cache, model_name, reference.version)
    return RegisteredAdapter(role, reference.version, reference.tags.get("genops.adapter_digest", reference.version),
                             str(adapter_dir))


def eval_report(
    context: dg.AssetExecutionContext,
    config: EvalConfig,
    base_model: dict,
    tuned_adapter: dict,
    task: TaskRef,
    warehouse: DuckDBWarehouse,
    mlflow: MlflowTracking,
    home: GenopsHome,
    judge: JudgeResource,
    storage: Storage,
) -> dg.Output[dict]:
    """Predictions on the held-out golden set for the base model (0-shot and k-shot), the tuned
    adapter and the current champion, all with the `production` prompt, scored (valid JSON,
    exact match per field, ROUGE-L/BLEU, latency), with the promotion decision and a
    Markdown/HTML report in MLflow. When the registry holds a `candidate` prompt, the tuned
    adapter is also run with it and the report shows the template diff beside the metric
    deltas. The candidate is evaluated both with its answers decoded within the task's output
    schema and without (valid JSON, field exact match, primary metric, latency p50 of each); the
    gate and serving parity use the task's `generation.constrained` setting. For a task whose
    examples carry retrieved contexts, also context precision / recall
    (string similarity, no LLM) and, through the judge, faithfulness and answer relevancy of every model's
    answers, with 95% intervals. Predictions and verdicts are cached by content. Cost: 2-4
    minutes on CPU for the embedded model (plus two judge calls per example and model for a
    task with contexts)."""
    require_quantization(config.quantization, "eval config quantization")
    spec = task.load()
    production = mlflow.resolve_prompt(spec)
    context.log.info(f"prompt: {production.name} v{production.version} (alias production)")
    schema = mart_schema(spec.name)
    golden = warehouse.query_df(f"select * from {schema}.golden_eval_dataset order by example_id")
    examples = examples_from_frame(golden.head(config.max_examples) if config.max_examples else golden)
    if not examples:
        raise ValueError("golden_eval_dataset is empty: nothing to evaluate against")
    golden_digest = sha256_json([e.identity() for e in examples])
    few_shots = None
    if config.base_few_shot > 0:
        pool = warehouse.query_df(f"select * from {schema}.few_shot_examples order by label, example_id")
        few_shots = select_few_shots(pool, [e.input_text for e in examples], config.few_shot_strategy,
                                     config.base_few_shot, home.cache_dir / "embeddings.sqlite")

    model_name, version = tuned_adapter["model_name"], str(tuned_adapter["version"])
    reference = gate_reference(mlflow, home, model_name, version)
    adapters = {"candidate": tuned_adapter["adapter_dir"]}
    if reference is not None:
        adapters[reference.adapter_name] = reference.adapter_dir

    @functools.cache
    def model():
        from genops_assets.serving.adapters import load_model

        context.log.info(f"loading {base_model['path']} with adapters {sorted(adapters)}")
        # The candidate's folder, or its published copy when this step runs on another node.
        here = {**adapters, "candidate": str(storage.local_copy(
            tuned_adapter["adapter_dir"], tuned_adapter.get("adapter_uri"), tuned_adapter["adapter_digest"],
            home.registry_cache))}
        return load_model(base_model["path"], here, quantization=config.quantization)

    setup = GoldenSetup(spec, examples, production.template,
                        quantized_identity(base_model["folder_digest"], config.quantization), version,
                        tuned_adapter["adapter_digest"], reference, few_shots, config.batch_size)
    cache = CallCache(home.cache_dir / "calls.sqlite")
    log = context.log.info
    golden_eval = evaluate_golden(model, setup, cache, log)
    cand = golden_eval.candidate
    evals = golden_eval.by_label()
    sampling = None
    if config.samples > 1:
        sampling = sample_pass_rates(model, "candidate", setup.candidate_digest, spec, examples, cache,
                                     config.samples, config.sample_temperature, config.batch_size, log,
                                     prompt=production.template)
    gate, baseline_role = promotion_gate(golden_eval, reference, spec.primary_metric, config.margin)
    context.log.info(f"promotion gate ({baseline_role}): {gate.reason}")

    decoding = compare_decoding(model, setup, cache, log, cand)
    sections = [decoding.section()]
    prompt_comparison = None
    candidate_prompt = mlflow.prompt_alias(production.name, CANDIDATE, spec.input_field)
    if candidate_prompt is not None and candidate_prompt.version != production.version:
        comparison = compare_prompt(model, setup, cache, log, production, candidate_prompt, cand)
        sections.append(comparison.section)
        evals[comparison.label] = comparison.evaluation
        prompt_comparison = comparison.summary

    rag = None
    if spec.contexts is not None:
        rag = rag_evaluation(context, config, spec, examples, evals, judge, base_model, cache)
        if rag["models"]:
            sections.append(rag_section(rag["models"], rag["retrieval"], rag["failures"], rag["rubrics"]))

    run_tags = {"genops.dagster_run_id": context.run.run_id, "genops.candidate_version": version,
                "genops.golden_digest": golden_digest, **prompt_tags(production)}
    with mlflow.run(f"genops/{spec.name}", f"eval-v{version}", run_tags) as run_id:
        mlflow.link_prompt(run_id, production)
        out_dir = home.runs_dir / "eval" / run_id
        paths = write_eval_report(out_dir, f"{spec.name}: candidate v{version} on {len(examples)} golden examples",
                                  {k: v.metrics for k, v in evals.items()}, metric_names(cand), gate.as_dict(),
                                  sample_predictions(evals), sections, {k: v.intervals for k, v in evals.items()},
                                  rag["retrieval"] if rag else None)
        predictions_file = write_predictions(out_dir / "predictions.jsonl", evals)
        mlflow.log_params(run_id, {"golden_examples": len(examples), "base_few_shot": config.base_few_shot,
                                   "few_shot_strategy": config.few_shot_strategy,
                                   "prompt_version": production.version, "prompt_digest": production.digest,
                                   "margin": config.margin, "primary_metric": spec.primary_metric,
                                   "candidate_version": version, "gate_baseline": gate.baseline_name})
        # The candidate's scores are its MLflow model's metrics too (MLflow's model view).
        mlflow.log_metrics(run_id, {**golden_eval.mlflow_metrics(), **decoding.mlflow_metrics(),
                                    **(rag_mlflow_metrics(rag) if rag else {})},
                           model_id=tuned_adapter.get("model_id"), model_prefix="candidate.")
        mlflow.log_artifacts(run_id, out_dir, "report")
        report_uri = storage.upload_dir(out_dir, f"reports/{spec.name}/eval/{run_id}")
        mlflow.set_version_tags(model_name, version, {
            "genops.eval.golden_digest": golden_digest,
            "genops.eval.run_id": run_id,
            "genops.eval.prompt_version": production.version,
            **{f"genops.eval.{m}": f"{cand.metrics[m]:.4f}" for m in SUMMARY_METRICS},
        })

    base = golden_eval.base
    reference_eval = golden_eval.reference
    value = {
        "candidate": {"version": version, "metrics": cand.metrics, "intervals": cand.intervals,
                      "golden_examples": len(examples)},
        "base": {"few_shot": few_shots.k if few_shots else 0, "metrics": base.metrics},
        "base_zero_shot": {"metrics": golden_eval.base_zero_shot.metrics},
        "few_shot": few_shots.selector if few_shots else None,
        "prompt": production.summary(),
        "prompt_comparison": prompt_comparison,
        "champion": ({"version": reference.version, "metrics": reference_eval.metrics}
                     if reference is not None and reference.role == "champion" else None),
        "previous_champion": ({"version": reference.version, "metrics": reference_eval.metrics}
                              if reference is not None and reference.role == "previous champion" else None),
        "gate": {**gate.as_dict(), "baseline_role": baseline_role},
        "golden_digest": golden_digest,
        "first_example": {"example_id": examples[0].example_id, "input": examples[0].input_text,
                          "candidate_prediction": cand.predictions[0]["prediction"],
                          **({"contexts": list(examples[0].contexts)} if examples[0].contexts else {})},
        "parity_examples": parity_examples(cand),
        "report_html": str(paths["html"]),
        "report_uri": report_uri,
        "predictions_file": str(predictions_file),
        "sampling": sampling,
        "mlflow_run_id": run_id,
        "model_calls": sum(ev.model_calls for ev in evals.values()),
        "rag": rag,
        "decoding": {"constrained": spec.constrained, "rows": decoding.rows()},
    }
    report_md = paths["markdown"].read_text().replace("![metrics](metrics.png)",
                                                      png_markdown("metrics", paths["chart"].read_bytes()))
    return dg.Output(value, metadata={
        "report": dg.MetadataValue.md(report_md),
        "report_html": dg.MetadataValue.path(str(paths["html"])),
        "report_uri": report_uri,
        "mlflow_run_id": run_id,
        "golden_examples": len(examples),
        "model_calls": value["model_calls"],
        "cache_hits": cache.stats()["hits"],
        **({"sampling": dg.MetadataValue.json(sampling)} if sampling else {}),
        "gate_passed": gate.passed,
        "gate_baseline": baseline_role,
        "prompt_version": production.version,
        **({"prompt_candidate_delta": float(prompt_comparison["deltas"][spec.primary_metric])}
           if prompt_comparison else {}),
        "gate": gate.reason,
        "decoding": dg.MetadataValue.table(
            [dg.TableRecord(r) for r in decoding.rows()],
            dg.TableSchema([dg.TableColumn("decoding", "string"), dg.TableColumn("task_setting", "bool"),
                            *(dg.TableColumn(m, "float") for m in decoding.metrics)])),
        **{f"candidate_{m}": float(cand.metrics[m]) for m in SUMMARY_METRICS},
        **{f"base_{m}": float(base.metrics[m]) for m in SUMMARY_METRICS},
        **{f"candidate_{k}": v for k, v in rouge_l_summary(cand.metrics, spec.text_fields).items()},
        **{f"base_{k}": v for k, v in rouge_l_summary(base.metrics, spec.text_fields).items()},
        **(rag_metadata(rag, cand) if rag else {}),
    })


def rag_evaluation(context, config: EvalConfig, spec, examples, evals: dict[str, ModelEval], judge: JudgeResource,
                   base_model: dict, cache: CallCache) -> dict:
    """Retrieval metrics of the golden set and, unless turned off, the judged faithfulness and
    answer relevancy of every evaluated model (their metrics and predictions gain them)."""
    from genops_assets.lib.judging import BUILTIN_RUBRICS, load_rubrics
    from genops_assets.lib.rag_metrics import evaluate_rag

    client = judge.connect(base_model["path"], cache=cache) if config.judge_rag else None
    if client is not None:
        context.log.info(f"RAG metrics: judge {client.model} at {client.base_url}")
    rag = evaluate_rag(client, load_rubrics(BUILTIN_RUBRICS, spec.root / "rubrics"), examples, evals,
                       seed=config.seed, log=context.log.info)
    rag["judge_usage"] = client.usage.as_dict(judge.price_in_per_1k, judge.price_out_per_1k) if client else None
    for label, failures in rag["failures"].items():
        if failures:
            context.log.warning(f"{label}: {len(failures)} judge call(s) failed and are left out of the means, "
                                f"e.g. {failures[0]['example_id']} {failures[0]['metric']}: {failures[0]['error']}")
    return rag


def rag_metadata(rag: dict, cand: ModelEval) -> dict:
    """Dagster metadata of the RAG metrics: the candidate's and the retrieval's means, and the
    whole summary (every model, intervals, failures) as JSON."""
    from genops_assets.lib.rag_metrics import JUDGED_METRICS

    out: dict = {"rag": dg.MetadataValue.json({k: rag[k] for k in ("retrieval", "models", "rubrics", "judge_usage")}),
                 "rag_judge_failures": sum(len(f) for f in rag["failures"].values())}
    out.update({metric: float(s["estimate"]) for metric, s in rag["retrieval"].items() if s["n"]})
    out.update({f"candidate_{m}": float(cand.metrics[m]) for m in JUDGED_METRICS if m in cand.metrics})
    return out


def build_evaluation_assets(task: TaskRef) -> list[dg.AssetsDefinition]:
    """The golden-set evaluation, the judge's certificate and the AutoSxS comparison of one task."""
    from genops_assets.defs.evaluation.certificate import judge_certificate
    from genops_assets.defs.evaluation.sxs import sxs_evaluation

    group = task_group(task, "evaluation")
    return [
        dg.asset(key_prefix=[task.name], group_name=group, kinds={"mlflow"}, ins=task_ins(task, "tuned_adapter"),
                 deps=[task_key(task, name) for name in ("golden_eval_dataset", "few_shot_examples",
                                                         "prompt_templates")])(bind_task(eval_report, task)),
        dg.asset(key_prefix=[task.name], group_name=group, kinds={"mlflow"},
                 deps=[task_key(task, name) for name in ("golden_eval_dataset", "prompt_templates",
                                                         "human_judgements")])(bind_task(judge_certificate, task)),
        dg.asset(key_prefix=[task.name], group_name=group, kinds={"mlflow"},
                 ins=task_ins(task, "eval_report", "judge_certificate"))(bind_task(sxs_evaluation, task)),
    ]
