"""Safety report: the red-team suite against the candidate (and the champion) behind the task's
guardrails, with the gate on no safety regression."""

from __future__ import annotations

import tempfile
from pathlib import Path

import dagster as dg

from genops_assets.components.binding import bind_task, task_group, task_key
from genops_assets.defs.evaluation.assets import gate_reference
from genops_assets.defs.safety.config import SafetyConfig
from genops_assets.lib.report import attack_success_png, png_markdown
from genops_assets.lib.safety_report import (
    CASES_FILE,
    GenerateFn,
    by_class,
    candidate_predictions,
    harmful_refusals,
    latency_summary,
    over_blocking,
    read_cases,
    report_markdown,
    reuse_tag,
    run_cases,
    safety_gate,
    summary_line,
    warm_up,
    write_cases,
)
from genops_assets.lib.tasks import TaskRef
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking

ARTIFACT_DIR = "safety"


def task_guardrails(spec, tokenizer) -> object:
    """The task's guardrails as the endpoint runs them, counting tokens with the served tokenizer."""
    from genops_assets.lib.guardrails.engine import Guardrails

    return Guardrails(spec.guardrails, count_tokens=lambda text: len(tokenizer.encode(text, add_special_tokens=False)))


def adapter_generate(loaded, adapter: str, max_new_tokens: int, batch_size: int) -> GenerateFn:
    """Greedy answers of one adapter of ``loaded``, batched like the evaluation's."""
    def generate(conversations):
        from genops_assets.serving.generation import generate as run

        return [r.text for r in run(loaded, list(conversations), adapter=adapter, max_new_tokens=max_new_tokens,
                                    temperature=0.0, batch_size=batch_size)]

    return generate


def champion_cases(mlflow: MlflowTracking, model_name: str, version: str, tag: str,
                   case_ids: list[str]) -> tuple[list[dict], str] | None:
    """The champion's per-case results logged before for the same suite, guardrails, prompt and
    decoding (found through its model-version tag), with their URI; None when there are none."""
    uri = mlflow.get_version(model_name, version).tags.get(tag)
    if not uri:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        rows = read_cases(mlflow.download(uri, tmp), case_ids)
    return None if rows is None else (rows, uri)


def safety_report(
    context: dg.AssetExecutionContext,
    config: SafetyConfig,
    base_model: dict,
    tuned_adapter: dict,
    eval_report: dict,
    task: TaskRef,
    mlflow: MlflowTracking,
    home: GenopsHome,
) -> dg.Output[dict]:
    """The versioned red-team suite (jailbreaks, direct and indirect injection, system-prompt
    extraction, harmful requests, encoded payloads) sent through the task's prompt to the
    candidate adapter behind the task's guardrails, in process: attack success rate per class
    (95% Wilson intervals), refusal rate on harmful requests, over-blocking on the golden set
    (the evaluation's answers, not generated again), guardrail latency. The champion answers the
    same cases (its results are reused when logged before for the same suite, guardrails, prompt
    and decoding); the gate fails on a regression. Cost: one greedy answer per case the input
    checks let through, per model; most attacks stop there (12 cases, 2 answered, took 47 s for
    the embedded model on 2 CPU cores, loading included)."""
    from genops_assets.lib.redteam import load_suite
    from genops_assets.serving.adapters import load_model

    spec = task.load()
    model_name, version = tuned_adapter["model_name"], str(tuned_adapter["version"])
    if str(eval_report["candidate"]["version"]) != version:
        raise dg.Failure(f"eval_report is for v{eval_report['candidate']['version']}, tuned_adapter is v{version}")
    production = mlflow.resolve_prompt(spec)
    max_new_tokens = config.max_new_tokens or production.template.max_new_tokens
    suite = load_suite(per_class=config.per_class)
    case_ids = [c.id for c in suite.cases]
    reference = gate_reference(mlflow, home, model_name, version)
    adapters = {"candidate": tuned_adapter["adapter_dir"]}
    if reference is not None:
        adapters[reference.adapter_name] = reference.adapter_dir
    loaded = load_model(base_model["path"], adapters)
    guardrails = task_guardrails(spec, loaded.tokenizer)
    warm_up(guardrails)
    tag = reuse_tag(suite.sha256, guardrails.version, production.digest, max_new_tokens)
    context.log.info(f"suite {suite.version} ({len(case_ids)} cases), guardrails {guardrails.version}")

    def evaluate(adapter: str) -> list[dict]:
        return run_cases(adapter_generate(loaded, adapter, max_new_tokens, config.batch_size), spec,
                         production.template, guardrails, suite, context.log.info)

    rows = evaluate("candidate")
    champ_rows, champ_uri = None, None
    if reference is not None:
        found = champion_cases(mlflow, model_name, reference.version, tag, case_ids)
        if found is not None:
            (champ_rows, champ_uri) = found
            context.log.info(f"{reference.label}: results reused from {champ_uri}")
        else:
            champ_rows = evaluate(reference.adapter_name)
    gate = safety_gate(rows, champ_rows, config.max_regression, config.alpha)
    context.log.info(f"safety gate: {gate['reason']}")
    refusals = harmful_refusals(rows)
    golden = over_blocking(guardrails, spec, production.template,
                           candidate_predictions(Path(eval_report["predictions_file"]), version))
    value = {
        "candidate": {"model_name": model_name, "version": version},
        "champion": (None if reference is None else {"model_name": model_name, "version": reference.version,
                                                      "role": reference.role, "reused_from": champ_uri}),
        "suite": {"version": suite.version, "sha256": suite.sha256, "cases": len(case_ids)},
        "guardrails_version": guardrails.version,
        "by_class": by_class(rows),
        "harmful_refusal_rate": None if refusals is None else refusals["rate"],
        "harmful_refusal": refusals,
        "over_blocking_rate": golden["rate"],
        "over_blocking": {k: v for k, v in golden.items() if k != "latencies_ms"},
        "guardrail_latency_ms": latency_summary([r["guardrail_latency_ms"] for r in rows] + golden["latencies_ms"]),
        "gate": gate,
    }
    champion_classes = by_class(champ_rows) if champ_rows else None
    run_tags = {"genops.dagster_run_id": context.run.run_id, "genops.candidate_version": version,
                "genops.suite_sha256": suite.sha256, "genops.guardrails_version": guardrails.version}
    with mlflow.run(f"genops/{spec.name}", f"safety-v{version}", run_tags) as run_id:
        out_dir = home.runs_dir / "safety" / run_id
        out_dir.mkdir(parents=True, exist_ok=True)
        chart = out_dir / "attack_success.png"
        chart.write_bytes(attack_success_png(value["by_class"], champion_classes))
        markdown = report_markdown(f"{spec.name}: safety of v{version}", value, champion_classes)
        (out_dir / "report.md").write_text(markdown + "\n![attack success](attack_success.png)\n", encoding="utf-8")
        write_cases(out_dir / CASES_FILE, rows)
        if champ_rows is not None and champ_uri is None:
            write_cases(out_dir / f"champion_{CASES_FILE}", champ_rows)
        mlflow.log_params(run_id, {"suite_version": suite.version, "suite_sha256": suite.sha256,
                                   "suite_cases": len(case_ids), "per_class": config.per_class,
                                   "guardrails_version": guardrails.version, "max_new_tokens": max_new_tokens,
                                   "prompt_version": production.version, "max_regression": config.max_regression,
                                   "alpha": config.alpha, "candidate_version": version,
                                   "champion_version": reference.version if reference else None})
        mlflow.log_metrics(run_id, safety_metrics(value))
        mlflow.log_artifacts(run_id, out_dir, ARTIFACT_DIR)
        mlflow.set_version_tags(model_name, version, {tag: f"runs:/{run_id}/{ARTIFACT_DIR}/{CASES_FILE}",
                                                      "genops.safety.run_id": run_id,
                                                      "genops.safety.gate_passed": str(gate["passed"])})
        if champ_rows is not None and champ_uri is None:
            mlflow.set_version_tags(model_name, reference.version,
                                    {tag: f"runs:/{run_id}/{ARTIFACT_DIR}/champion_{CASES_FILE}"})
    value["mlflow_run_id"] = run_id
    return dg.Output(value, metadata={
        "report": dg.MetadataValue.md(markdown + "\n" + png_markdown("attack success by class", chart.read_bytes())),
        "summary": summary_line(value),
        "gate_passed": gate["passed"],
        "gate": gate["reason"],
        "suite_version": suite.version,
        "suite_sha256": suite.sha256,
        "guardrails_version": guardrails.version,
        "candidate_version": version,
        "champion_version": reference.version if reference else "none",
        "champion_reused": champ_uri is not None,
        "mlflow_run_id": run_id,
        **{k: float(v) for k, v in safety_metrics(value).items()},
    })


def safety_metrics(value: dict) -> dict[str, float]:
    """The report's numbers as MLflow metrics / Dagster metadata."""
    out = {f"asr_{c}": s["attack_success_rate"] for c, s in value["by_class"].items()}
    if value["harmful_refusal_rate"] is not None:
        out["harmful_refusal_rate"] = value["harmful_refusal_rate"]
    out["over_blocking_rate"] = value["over_blocking_rate"]
    out.update({f"guardrail_latency_{q}_ms": value["guardrail_latency_ms"][q] for q in ("p50", "p95")})
    return out


def safety_asset(task: TaskRef, name: str, group: str, adapter: str, report: str,
                 description: str | None = None) -> dg.AssetsDefinition:
    """``safety_report`` bound to one of the task's candidates (its adapter and eval report)."""
    ins = {"tuned_adapter": dg.AssetIn(key=task_key(task, adapter)),
           "eval_report": dg.AssetIn(key=task_key(task, report))}
    return dg.asset(name=name, key_prefix=[task.name], group_name=group, kinds={"mlflow"}, ins=ins,
                    description=description)(bind_task(safety_report, task))


def build_safety_assets(task: TaskRef) -> list[dg.AssetsDefinition]:
    """The safety report of the task's SFT candidate, in its evaluation group."""
    return [safety_asset(task, "safety_report", task_group(task, "evaluation"), "tuned_adapter", "eval_report")]

