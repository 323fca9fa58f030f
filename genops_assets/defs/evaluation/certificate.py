"""judge_certificate: the configured judge measured before its verdicts may count."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import dagster as dg

from genops_assets.defs.evaluation.config import JudgeCertificateConfig
from genops_assets.defs.evaluation.sxs import HUMAN_TABLE, judge_input
from genops_assets.lib.cache import CallCache
from genops_assets.lib.tasks import TaskRef
from resources.judge import JudgeResource
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking
from resources.warehouse import DuckDBWarehouse, mart_schema

CERTIFY_SPLIT = "certify"


def read_human_choices(warehouse: DuckDBWarehouse, task: str) -> tuple[list, str]:
    """The task's human-labelled comparisons of the ``certify`` split, and where they came from
    (or why there are none)."""
    from genops_assets.lib.judge_certificate import human_choices_from_frame

    schema = mart_schema(task)
    if not warehouse.table_exists(schema, HUMAN_TABLE):
        return [], f"{schema}.{HUMAN_TABLE} does not exist (no ratings built yet): human statistics not computed"
    df = warehouse.query_df(f"select * from {schema}.{HUMAN_TABLE} where split = ? order by item_id",
                            [CERTIFY_SPLIT])
    return human_choices_from_frame(df), f"{schema}.{HUMAN_TABLE}, split {CERTIFY_SPLIT}: {len(df)} rows"


def judge_certificate(
    context: dg.AssetExecutionContext,
    config: JudgeCertificateConfig,
    base_model: dict,
    task: TaskRef,
    judge: JudgeResource,
    warehouse: DuckDBWarehouse,
    mlflow: MlflowTracking,
    home: GenopsHome,
) -> dg.Output[dict]:
    """The configured judge's certificate with the pairwise rubric: position consistency, repeat
    stability, agreement with people on the `certify` split of human_judgements (kappa, balanced
    accuracy, confusion matrix), length bias and the objective probe built from the first
    `judge.max_probe_examples` golden examples; thresholds from task.yaml `judge:`. With no
    human labels it still measures the rest and is not certified. Logged to MLflow (kind
    judge_certificate) with the judge and rubric digests. Judge calls are cached by content.
    Cost: (1 + repeats) judge calls per pair; about 3 pairs per golden example."""
    from genops_assets.lib.evaluation import examples_from_frame
    from genops_assets.lib.hashing import atomic_write_text, sha256_text
    from genops_assets.lib.judge_certificate import certify
    from genops_assets.lib.judging import BUILTIN_RUBRICS, load_rubrics
    from genops_assets.lib.probes import probe_pairs

    spec = task.load()
    rubrics = load_rubrics(BUILTIN_RUBRICS, spec.root / "rubrics")
    if config.rubric not in rubrics:
        raise ValueError(f"unknown rubric '{config.rubric}'; available: {sorted(rubrics)} "
                         f"(built-in {BUILTIN_RUBRICS}, task {spec.root / 'rubrics'})")
    rubric = rubrics[config.rubric]
    rubric_digest = sha256_text(Path(rubric.source).read_text(encoding="utf-8"))
    prompt = mlflow.resolve_prompt(spec).template

    human, human_source = read_human_choices(warehouse, spec.name)
    human = [dataclasses.replace(h, input_text=judge_input(spec, h.input_text, prompt)) for h in human]
    limit = config.max_probe_examples or spec.judge.max_probe_examples
    golden = warehouse.query_df(f"select * from {mart_schema(spec.name)}.golden_eval_dataset order by example_id")
    examples = examples_from_frame(golden)[:limit]
    if not examples:
        raise ValueError(f"{mart_schema(spec.name)}.golden_eval_dataset is empty: no objective probe to build")
    shown = {e.example_id: judge_input(spec, e.input_text, prompt, e.contexts) for e in examples}
    probes = probe_pairs([(e.example_id, shown[e.example_id], e.reference) for e in examples], spec, seed=config.seed)
    context.log.info(f"human labels: {human_source}; probe: {len(probes)} pairs from {len(examples)} golden examples")

    # The task's certified judge adapter when it has one (as AutoSxS asks), else the configured judge.
    client = judge.connect(base_model["path"], cache=CallCache(home.cache_dir / "calls.sqlite"), task=spec.name)
    cert = certify(client, rubric, human, probes, spec.judge, repeats=config.repeats, seed=config.seed,
                   log=context.log.info)
    usage = client.usage.as_dict(judge.price_in_per_1k, judge.price_out_per_1k)
    rubric_label = f"{rubric.name}@{rubric.version}"
    document = {**cert.as_dict(), "judge_model": client.model, "judge_url": client.base_url, "rubric": rubric_label,
                "rubric_digest": rubric_digest, "human_labels_source": human_source,
                "probe_examples": len(examples), "judge_usage": usage}

    run_tags = {"genops.dagster_run_id": context.run.run_id, "genops.kind": "judge_certificate",
                "genops.judge_model": client.model, "genops.judge_url": client.base_url,
                "genops.judge_rubric": rubric_label, "genops.judge_rubric_digest": rubric_digest,
                "genops.judge_certified": str(cert.passed).lower(),
                # The local judge serves the base model: its digest names the judge's weights.
                **({"genops.judge_base_model_digest": str(base_model.get("folder_digest", ""))}
                   if not judge.base_url else {})}
    with mlflow.run(f"genops/{spec.name}", "judge-certificate", run_tags) as run_id:
        out_dir = home.runs_dir / "judge_certificate" / run_id
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "certificate.json", json.dumps(document, indent=2, ensure_ascii=False))
        mlflow.log_params(run_id, {"repeats": config.repeats, "seed": config.seed, "probe_examples": len(examples),
                                   "human_labels": cert.statistics["human"]["n"],
                                   **{f"threshold.{k}": v for k, v in spec.judge.model_dump().items()}})
        metrics = {f"cert_{name}": c.value for name, c in cert.checks.items() if c.value is not None}
        metrics.update({f"cert_probe_{kind}": s["accuracy"] for kind, s in cert.statistics["probe"]["by_kind"].items()
                        if s["accuracy"] is not None})
        metrics["cert_passed"] = float(cert.passed)
        if cert.labels_needed is not None:
            metrics["cert_labels_needed"] = float(cert.labels_needed)
        metrics.update({f"judge_{k}": float(v) for k, v in usage.items()})
        mlflow.log_metrics(run_id, metrics)
        mlflow.log_artifacts(run_id, out_dir, "judge_certificate")

    value = {"certified": cert.passed, "judge_model": client.model, "judge_url": client.base_url,
             "rubric": rubric_label, "rubric_digest": rubric_digest, "certificate": cert.as_dict(),
             "mlflow_run_id": run_id}
    rows = "\n".join(f"| {name} | {'not computed' if c.value is None else f'{c.value:.3f}'} | {c.direction} "
                     f"{c.threshold} | {'pass' if c.passed else 'FAIL'} | {c.detail} |"
                     for name, c in cert.checks.items())
    verdict = "CERTIFIED" if cert.passed else "NOT CERTIFIED: its verdicts are shown, never used as a result"
    return dg.Output(value, metadata={
        "certified": cert.passed,
        "judge": f"{client.model} at {client.base_url}",
        "rubric": rubric_label,
        "rubric_digest": rubric_digest,
        "certificate": dg.MetadataValue.md(
            f"**{verdict}**\n\n| check | value | needs | | detail |\n|---|---|---|---|---|\n{rows}\n\n"
            f"Human labels needed: {cert.labels_needed if cert.labels_needed is not None else 'none would do'} "
            f"({cert.labels_needed_reason})."),
        "failures": dg.MetadataValue.json(cert.failures),
        "labels_needed": cert.labels_needed if cert.labels_needed is not None else cert.labels_needed_reason,
        "human_labels": cert.statistics["human"]["n"],
        "human_labels_source": human_source,
        "probe_pairs": cert.statistics["probe"]["n"],
        "judge_usage": dg.MetadataValue.json(usage),
        "mlflow_run_id": run_id,
    })
