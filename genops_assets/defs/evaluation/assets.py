"""Golden-set evaluation of base model, candidate adapter and current champion, with a report."""


import base64
import json
from pathlib import Path

import dagster as dg

from genops_assets.defs.evaluation.config import EvalConfig
from genops_assets.lib.cache import CallCache
from genops_assets.lib.evaluation import (
    ModelEval,
    evaluate_model,
    examples_from_frame,
    gate_decision,
    sample_pass_rates,
)
from genops_assets.lib.hashing import sha256_json
from genops_assets.lib.report import rag_section, write_eval_report
from resources.judge import JudgeResource
from resources.paths import GenopsHome
from resources.task import TaskResource
from resources.tracking import CHAMPION, MlflowTracking, prompt_tags
from resources.warehouse import MART_SCHEMA, DuckDBWarehouse

SUMMARY_METRICS = ("valid_json_rate", "mean_field_exact_match", "overall_exact_match")


def metric_names_of(ev: ModelEval) -> list[str]:
    return [m for m in ev.metrics if m != "n_examples"]


@dg.asset(group_name="evaluation", kinds={"mlflow"},
          deps=[dg.AssetKey("golden_eval_dataset"), dg.AssetKey("few_shot_examples"), dg.AssetKey("prompt_templates")])
def eval_report(
    context: dg.AssetExecutionContext,
    config: EvalConfig,
    base_model: dict,
    tuned_adapter: dict,
    task: TaskResource,
    warehouse: DuckDBWarehouse,
    mlflow: MlflowTracking,
    home: GenopsHome,
    judge: JudgeResource,
) -> dg.Output[dict]:
    """Predictions on the held-out golden set for the base model (0-shot and k-shot), the tuned
    adapter and the current champion, all with the `production` prompt, scored (valid JSON,
    exact match per field, ROUGE-L/BLEU, latency), with the promotion decision and a
    Markdown/HTML report in MLflow. When the registry holds a `candidate` prompt, the tuned
    adapter is also run with it and the report shows the template diff beside the metric
    deltas. For a task whose examples carry retrieved contexts, also context precision / recall
    (ragas, no LLM) and, through the judge, faithfulness and answer relevancy of every model's
    answers, with 95% intervals. Predictions and verdicts are cached by content. Cost: 2-4
    minutes on CPU for the embedded model (plus two judge calls per example and model for a
    task with contexts)."""
    from genops_assets.lib.prompts import CANDIDATE

    spec = task.load()
    production = mlflow.resolve_prompt(spec)
    prompt = production.template
    context.log.info(f"prompt: {production.name} v{production.version} (alias production)")
    golden = warehouse.query_df(f"select * from {MART_SCHEMA}.golden_eval_dataset order by example_id")
    if config.max_examples:
        golden = golden.head(config.max_examples)
    examples = examples_from_frame(golden)
    if not examples:
        raise ValueError("golden_eval_dataset is empty: nothing to evaluate against")
    golden_digest = sha256_json([e.identity() for e in examples])

    shots_per_example = None
    selector_info = None
    if config.base_few_shot > 0:
        from genops_assets.lib.fewshot import FewShotSelector, Shot, shots_as_pairs

        pool = warehouse.query_df(f"select * from {MART_SCHEMA}.few_shot_examples order by label, example_id")
        embedder = None
        if config.few_shot_strategy == "nearest":
            from genops_assets.lib.embeddings import Embedder

            embedder = Embedder(cache_path=home.cache_dir / "embeddings.sqlite")
        selector = FewShotSelector([Shot(r.example_id, r.input_text, json.loads(r.output_json), r.label)
                                    for r in pool.itertuples()], config.few_shot_strategy, config.base_few_shot,
                                   embedder=embedder)
        shots_per_example = [shots_as_pairs(s) for s in selector.select_many([e.input_text for e in examples])]
        selector_info = selector.describe()

    model_name = tuned_adapter["model_name"]
    version = str(tuned_adapter["version"])
    champion = mlflow.alias(model_name, CHAMPION)
    adapters = {"candidate": tuned_adapter["adapter_dir"]}
    if champion is not None and champion.version != version:
        adapters["champion"] = str(mlflow.fetch_registered_adapter(home.registry_cache, model_name, champion.version))

    holder: dict = {}

    def load():
        if "m" not in holder:
            from genops_assets.serving.adapters import load_model

            context.log.info(f"loading {base_model['path']} with adapters {sorted(adapters)}")
            holder["m"] = load_model(base_model["path"], adapters)
        return holder["m"]

    cache = CallCache(home.cache_dir / "calls.sqlite")
    log = context.log.info
    base0 = evaluate_model(load, None, "base 0-shot", base_model["folder_digest"], spec, examples, [], cache,
                           config.batch_size, log, prompt=prompt)
    base = base0
    if shots_per_example is not None:
        base = evaluate_model(load, None, f"base {config.base_few_shot}-shot", base_model["folder_digest"], spec,
                              examples, [], cache, config.batch_size, log, prompt=prompt,
                              shots_per_example=shots_per_example)
    # An adapter's answers depend on the base it sits on: the cache key holds both digests.
    def on_base(adapter_digest: str) -> str:
        return sha256_json([base_model["folder_digest"], adapter_digest])

    cand = evaluate_model(load, "candidate", f"v{version}", on_base(tuned_adapter["adapter_digest"]), spec, examples, [],
                          cache, config.batch_size, log, prompt=prompt)
    evals: dict[str, ModelEval] = {"base (0-shot)": base0}
    if base is not base0:
        evals[f"base ({config.base_few_shot}-shot, {config.few_shot_strategy})"] = base
    evals[f"candidate v{version}"] = cand
    sampling = None
    if config.samples > 1:
        sampling = sample_pass_rates(load, "candidate", on_base(tuned_adapter["adapter_digest"]), spec, examples,
                                     cache, config.samples, config.sample_temperature, config.batch_size, log,
                                     prompt=prompt)
    champ_eval = None
    if "champion" in adapters:
        champ_eval = evaluate_model(load, "champion", f"champion v{champion.version}",
                                    on_base(champion.tags.get("genops.adapter_digest", champion.version)),
                                    spec, examples, [], cache, config.batch_size, log, prompt=prompt)
        evals[f"champion v{champion.version}"] = champ_eval

    if champion is not None and champion.version == version:
        gate = gate_decision(cand.metrics, cand.metrics, f"champion v{version} (itself)", spec.primary_metric, 0.0)
    elif champ_eval is not None:
        gate = gate_decision(cand.metrics, champ_eval.metrics, f"champion v{champion.version}", spec.primary_metric,
                             config.margin, cand.scores, champ_eval.scores)
    else:
        gate = gate_decision(cand.metrics, base.metrics, "base model", spec.primary_metric, config.margin,
                             cand.scores, base.scores)
    context.log.info(f"promotion gate: {gate.reason}")

    # A candidate prompt in the registry: the tuned adapter with it, beside production.
    sections = []
    prompt_comparison = None
    cand_prompt = mlflow.prompt_alias(production.name, CANDIDATE, spec.input_field)
    if cand_prompt is not None and cand_prompt.version != production.version:
        from genops_assets.lib.metrics import per_example
        from genops_assets.lib.prompts import template_diff
        from genops_assets.lib.report import prompt_comparison_section
        from genops_assets.lib.stats import paired_difference_ci

        pe = evaluate_model(load, "candidate", f"v{version} + prompt v{cand_prompt.version}",
                            on_base(tuned_adapter["adapter_digest"]), spec, examples, [], cache, config.batch_size,
                            log, prompt=cand_prompt.template)
        old_label, new_label = f"prompt v{production.version} (production)", f"prompt v{cand_prompt.version} (candidate)"
        diff = template_diff(production.template, cand_prompt.template, old_label, new_label)
        compared = [m for m in metric_names_of(cand) if m in pe.metrics]
        rows = [(m, float(cand.metrics[m]), float(pe.metrics[m])) for m in compared]
        ci = paired_difference_ci(per_example(pe.scores, spec.primary_metric),
                                  per_example(cand.scores, spec.primary_metric)).as_dict()
        sections.append(prompt_comparison_section(old_label, new_label, diff, rows, ci, spec.primary_metric))
        evals[f"candidate v{version} + prompt v{cand_prompt.version}"] = pe
        prompt_comparison = {"production_version": production.version, "candidate_version": cand_prompt.version,
                             "deltas": {m: b - a for m, a, b in rows}, "primary_interval": ci, "diff": diff}

    rag = None
    if spec.contexts is not None:
        rag = rag_evaluation(context, config, spec, examples, evals, judge, base_model, cache)
        if rag["models"]:
            sections.append(rag_section(rag["models"], rag["retrieval"], rag["failures"], rag["rubrics"]))

    metric_names = metric_names_of(cand)
    samples = []
    for i in range(min(5, len(examples))):
        for label, ev in evals.items():
            p = ev.predictions[i]
            samples.append({"example_id": p["example_id"], "model": label, "input": p["input"],
                            "prediction": p["prediction"], "valid_json": p["valid_json"]})
    run_id = mlflow.start_run(f"genops/{spec.name}", f"eval-v{version}",
                              tags={"genops.dagster_run_id": context.run.run_id, "genops.candidate_version": version,
                                    "genops.golden_digest": golden_digest, **prompt_tags(production)})
    mlflow.link_prompt(run_id, production)
    out_dir = home.runs_dir / "eval" / run_id
    paths = write_eval_report(out_dir, f"{spec.name}: candidate v{version} on {len(examples)} golden examples",
                              {k: v.metrics for k, v in evals.items()}, metric_names, gate.as_dict(), samples,
                              sections, {k: v.intervals for k, v in evals.items()},
                              rag["retrieval"] if rag else None)
    with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as fh:
        for label, ev in evals.items():
            for p in ev.predictions:
                fh.write(json.dumps({"model": label, **p}, ensure_ascii=False) + "\n")
    mlflow.log_params(run_id, {"golden_examples": len(examples), "base_few_shot": config.base_few_shot,
                               "few_shot_strategy": config.few_shot_strategy, "prompt_version": production.version,
                               "prompt_digest": production.digest, "margin": config.margin,
                               "primary_metric": spec.primary_metric, "candidate_version": version})
    prefixed = {}
    for key, ev in (("base_0shot", base0), ("base", base), ("candidate", cand), ("champion", champ_eval)):
        if ev is not None:
            prefixed.update({f"{key}.{m}": v for m, v in ev.metrics.items()})
            prefixed.update({f"{key}.{m}_{b}": iv[b] for m, iv in ev.intervals.items() for b in ("low", "high")})
    if rag:
        prefixed.update(rag_mlflow_metrics(rag))
    mlflow.log_metrics(run_id, prefixed)
    mlflow.log_artifacts(run_id, out_dir, "report")
    mlflow.set_version_tags(model_name, version, {
        "genops.eval.golden_digest": golden_digest,
        "genops.eval.run_id": run_id,
        "genops.eval.prompt_version": production.version,
        **{f"genops.eval.{m}": f"{cand.metrics[m]:.4f}" for m in SUMMARY_METRICS},
    })
    mlflow.end_run(run_id)

    value = {
        "candidate": {"version": version, "metrics": cand.metrics},
        "base": {"few_shot": config.base_few_shot if base is not base0 else 0, "metrics": base.metrics},
        "base_zero_shot": {"metrics": base0.metrics},
        "few_shot": selector_info,
        "prompt": production.summary(),
        "prompt_comparison": prompt_comparison,
        "champion": None if champ_eval is None else {"version": champion.version, "metrics": champ_eval.metrics},
        "gate": gate.as_dict(),
        "golden_digest": golden_digest,
        "first_example": {"example_id": examples[0].example_id, "input": examples[0].input_text,
                          "candidate_prediction": cand.predictions[0]["prediction"],
                          **({"contexts": list(examples[0].contexts)} if examples[0].contexts else {})},
        # Greedy answers the deployed endpoint must reproduce (serving parity).
        "parity_examples": [{"example_id": p["example_id"], "input": p["input"], "prediction": p["prediction"],
                             **({"contexts": p["contexts"]} if "contexts" in p else {})}
                            for p in cand.predictions[:16]],
        "report_html": str(paths["html"]),
        "predictions_file": str(out_dir / "predictions.jsonl"),
        "sampling": sampling,
        "mlflow_run_id": run_id,
        "model_calls": sum(ev.model_calls for ev in evals.values()),
        "rag": rag,
    }
    chart = base64.b64encode(paths["chart"].read_bytes()).decode()
    md = paths["markdown"].read_text().replace("![metrics](metrics.png)", f"![metrics](data:image/png;base64,{chart})")
    return dg.Output(value, metadata={
        "report": dg.MetadataValue.md(md),
        "report_html": dg.MetadataValue.path(str(paths["html"])),
        "mlflow_run_id": run_id,
        "golden_examples": len(examples),
        "model_calls": sum(ev.model_calls for ev in evals.values()),
        "cache_hits": cache.stats()["hits"],
        **({"sampling": dg.MetadataValue.json(sampling)} if sampling else {}),
        "gate_passed": gate.passed,
        "prompt_version": production.version,
        **({"prompt_candidate_delta": float(prompt_comparison["deltas"][spec.primary_metric])}
           if prompt_comparison else {}),
        "gate": gate.reason,
        **{f"candidate_{m}": float(cand.metrics[m]) for m in SUMMARY_METRICS},
        **{f"base_{m}": float(base.metrics[m]) for m in SUMMARY_METRICS},
        "candidate_rouge_l": float(cand.metrics.get("rouge_l_summary", 0.0)),
        "base_rouge_l": float(base.metrics.get("rouge_l_summary", 0.0)),
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


def rag_mlflow_metrics(rag: dict) -> dict[str, float]:
    """Retrieval metrics once (``retrieval.*``) and the judge's usage (``rag_judge.*``: calls,
    cached, failures); the judged means and intervals are logged with each model's metrics."""
    out: dict[str, float] = {}
    for metric, summary in rag["retrieval"].items():
        out[f"retrieval.{metric}_n"] = float(summary["n"])
        if summary["n"]:
            out.update({f"retrieval.{metric}": summary["estimate"], f"retrieval.{metric}_low": summary["low"],
                        f"retrieval.{metric}_high": summary["high"]})
    if rag["judge_usage"]:
        out.update({f"rag_judge.{k}": float(v) for k, v in rag["judge_usage"].items()})
    return out


def rag_metadata(rag: dict, cand: ModelEval) -> dict:
    """Dagster metadata of the RAG metrics: the candidate's and the retrieval's means, and the
    whole summary (every model, intervals, failures) as JSON."""
    from genops_assets.lib.rag_metrics import JUDGED_METRICS

    out: dict = {"rag": dg.MetadataValue.json({k: rag[k] for k in ("retrieval", "models", "rubrics", "judge_usage")}),
                 "rag_judge_failures": sum(len(f) for f in rag["failures"].values())}
    out.update({metric: float(s["estimate"]) for metric, s in rag["retrieval"].items() if s["n"]})
    out.update({f"candidate_{m}": float(cand.metrics[m]) for m in JUDGED_METRICS if m in cand.metrics})
    return out
