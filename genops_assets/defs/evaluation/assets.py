"""Golden-set evaluation of base model, candidate adapter and current champion, with a report."""


import base64
import json
import shutil
from pathlib import Path

import dagster as dg

from genops_assets.defs.datasets.assets import MART_SCHEMA
from genops_assets.defs.evaluation.config import EvalConfig
from genops_assets.lib.cache import CallCache
from genops_assets.lib.evaluation import EvalExample, ModelEval, evaluate_model, gate_decision, sample_pass_rates
from genops_assets.lib.hashing import atomic_dir, file_digests, sha256_json
from genops_assets.lib.report import write_eval_report
from resources.paths import GenopsHome
from resources.task import TaskResource
from resources.tracking import CHAMPION, MlflowTracking
from resources.warehouse import DuckDBWarehouse

SUMMARY_METRICS = ("valid_json_rate", "mean_field_exact_match", "overall_exact_match")


def fetch_registered_adapter(mlflow: MlflowTracking, home: GenopsHome, model_name: str, version: str) -> Path:
    """A local copy of a registered adapter, checked against the digest recorded at registration."""
    mv = mlflow.get_version(model_name, version)
    target = home.cache_dir / "registry" / model_name / f"v{version}"
    if not target.is_dir():
        with atomic_dir(target) as tmp:
            src = mlflow.download(mv.source, tmp / "dl")
            for item in src.iterdir():
                shutil.move(str(item), tmp / item.name)
            shutil.rmtree(tmp / "dl", ignore_errors=True)
    expected = mv.tags.get("genops.adapter_digest")
    actual = sha256_json(file_digests(target))
    if expected and actual != expected:
        raise RuntimeError(
            f"{model_name} v{version}: adapter files at {mv.source} have digest {actual[:12]}, "
            f"registered as {expected[:12]}; refusing to use a modified artifact"
        )
    return target


@dg.asset(group_name="evaluation", kinds={"mlflow"}, deps=[dg.AssetKey("golden_eval_dataset"), dg.AssetKey("few_shot_examples")])
def eval_report(
    context: dg.AssetExecutionContext,
    config: EvalConfig,
    base_model: dict,
    tuned_adapter: dict,
    task: TaskResource,
    warehouse: DuckDBWarehouse,
    mlflow: MlflowTracking,
    home: GenopsHome,
) -> dg.Output[dict]:
    """Predictions on the held-out golden set for the base model, the tuned adapter and the
    current champion, scored (valid JSON, exact match per field, ROUGE-L/BLEU, latency), with
    the promotion decision and a Markdown/HTML report in MLflow. Predictions are cached by
    content. Cost: 1-3 minutes on CPU for the embedded model."""
    spec = task.load()
    golden = warehouse.query_df(f"select * from {MART_SCHEMA}.golden_eval_dataset order by example_id")
    if config.max_examples:
        golden = golden.head(config.max_examples)
    examples = [EvalExample(r.example_id, r.input_text, json.loads(r.output_json)) for r in golden.itertuples()]
    if not examples:
        raise ValueError("golden_eval_dataset is empty: nothing to evaluate against")
    golden_digest = sha256_json([(e.example_id, e.input_text, e.reference) for e in examples])

    shots: list[tuple[str, dict]] = []
    if config.base_few_shot > 0:
        pool = warehouse.query_df(f"select * from {MART_SCHEMA}.few_shot_examples order by label, example_id")
        # Take examples label by label so the base model sees different classes.
        picked = pool.groupby("label", sort=True).head(1).head(config.base_few_shot)
        shots = [(r.input_text, json.loads(r.output_json)) for r in picked.itertuples()]

    model_name = tuned_adapter["model_name"]
    version = str(tuned_adapter["version"])
    champion = mlflow.alias(model_name, CHAMPION)
    adapters = {"candidate": tuned_adapter["adapter_dir"]}
    if champion is not None and champion.version != version:
        adapters["champion"] = str(fetch_registered_adapter(mlflow, home, model_name, champion.version))

    holder: dict = {}

    def load():
        if "m" not in holder:
            from genops_assets.lib.generation import load_model

            context.log.info(f"loading {base_model['path']} with adapters {sorted(adapters)}")
            holder["m"] = load_model(base_model["path"], adapters)
        return holder["m"]

    cache = CallCache(home.cache_dir / "calls.sqlite")
    log = context.log.info
    base = evaluate_model(load, None, "base", base_model["folder_digest"], spec, examples, shots, cache,
                          config.batch_size, log)
    # An adapter's answers depend on the base it sits on: the cache key holds both digests.
    def on_base(adapter_digest: str) -> str:
        return sha256_json([base_model["folder_digest"], adapter_digest])

    cand = evaluate_model(load, "candidate", f"v{version}", on_base(tuned_adapter["adapter_digest"]), spec, examples, [],
                          cache, config.batch_size, log)
    evals: dict[str, ModelEval] = {f"base ({len(shots)}-shot)": base, f"candidate v{version}": cand}
    sampling = None
    if config.samples > 1:
        sampling = sample_pass_rates(load, "candidate", on_base(tuned_adapter["adapter_digest"]), spec, examples,
                                     cache, config.samples, config.sample_temperature, config.batch_size, log)
    champ_eval = None
    if "champion" in adapters:
        champ_eval = evaluate_model(load, "champion", f"champion v{champion.version}",
                                    on_base(champion.tags.get("genops.adapter_digest", champion.version)),
                                    spec, examples, [], cache, config.batch_size, log)
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

    metric_names = [m for m in cand.metrics if m != "n_examples"]
    samples = []
    for i in range(min(5, len(examples))):
        for label, ev in evals.items():
            p = ev.predictions[i]
            samples.append({"example_id": p["example_id"], "model": label, "input": p["input"],
                            "prediction": p["prediction"], "valid_json": p["valid_json"]})
    run_id = mlflow.start_run(f"genops/{spec.name}", f"eval-v{version}",
                              tags={"genops.dagster_run_id": context.run.run_id, "genops.candidate_version": version,
                                    "genops.golden_digest": golden_digest})
    out_dir = home.runs_dir / "eval" / run_id
    paths = write_eval_report(out_dir, f"{spec.name}: candidate v{version} on {len(examples)} golden examples",
                              {k: v.metrics for k, v in evals.items()}, metric_names, gate.as_dict(), samples)
    with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as fh:
        for label, ev in evals.items():
            for p in ev.predictions:
                fh.write(json.dumps({"model": label, **p}, ensure_ascii=False) + "\n")
    mlflow.log_params(run_id, {"golden_examples": len(examples), "base_few_shot": len(shots), "margin": config.margin,
                               "primary_metric": spec.primary_metric, "candidate_version": version})
    prefixed = {}
    for key, ev in (("base", base), ("candidate", cand), ("champion", champ_eval)):
        if ev is not None:
            prefixed.update({f"{key}.{m}": v for m, v in ev.metrics.items()})
    mlflow.log_metrics(run_id, prefixed)
    mlflow.log_artifacts(run_id, out_dir, "report")
    mlflow.set_version_tags(model_name, version, {
        "genops.eval.golden_digest": golden_digest,
        "genops.eval.run_id": run_id,
        **{f"genops.eval.{m}": f"{cand.metrics[m]:.4f}" for m in SUMMARY_METRICS},
    })
    mlflow.end_run(run_id)

    value = {
        "candidate": {"version": version, "metrics": cand.metrics},
        "base": {"few_shot": len(shots), "metrics": base.metrics},
        "champion": None if champ_eval is None else {"version": champion.version, "metrics": champ_eval.metrics},
        "gate": gate.as_dict(),
        "golden_digest": golden_digest,
        "first_example": {"example_id": examples[0].example_id, "input": examples[0].input_text,
                          "candidate_prediction": cand.predictions[0]["prediction"]},
        "report_html": str(paths["html"]),
        "predictions_file": str(out_dir / "predictions.jsonl"),
        "sampling": sampling,
        "mlflow_run_id": run_id,
        "model_calls": sum(ev.model_calls for ev in evals.values()),
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
        "gate": gate.reason,
        **{f"candidate_{m}": float(cand.metrics[m]) for m in SUMMARY_METRICS},
        **{f"base_{m}": float(base.metrics[m]) for m in SUMMARY_METRICS},
        "candidate_rouge_l": float(cand.metrics.get("rouge_l_summary", 0.0)),
        "base_rouge_l": float(base.metrics.get("rouge_l_summary", 0.0)),
    })
