"""AutoSxS: the judge compares the candidate with a baseline on the golden set, both orders."""

import json
from pathlib import Path

import dagster as dg

from genops_assets.defs.evaluation.config import SxsConfig
from genops_assets.lib.cache import CallCache
from genops_assets.lib.formatting import build_messages
from genops_assets.lib.jsonl import iter_jsonl
from genops_assets.lib.report import png_markdown
from genops_assets.lib.tasks import TaskRef
from resources.judge import JudgeResource
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking, prompt_tags
from resources.warehouse import DuckDBWarehouse, mart_schema

HUMAN_TABLE = "human_judgements"


def human_outcomes(warehouse: DuckDBWarehouse, task: str, candidate: str, baseline: str) -> tuple[dict[str, str], str]:
    """The candidate's outcome by example id where people compared exactly these two versions
    on a golden prompt (`certify` split of human_judgements; one item per example, the one with
    the most ratings), and where they came from."""
    from genops_assets.lib.sxs import human_outcome

    schema = mart_schema(task)
    if not warehouse.table_exists(schema, HUMAN_TABLE):
        return {}, f"{schema}.{HUMAN_TABLE} does not exist: no human labels"
    df = warehouse.query_df(
        f"""select example_id, model_1, model_2, human_choice from {schema}.{HUMAN_TABLE}
            where split = 'certify' and example_id is not null
              and ((model_1 = ? and model_2 = ?) or (model_1 = ? and model_2 = ?))
            order by example_id, n_ratings desc, item_id""", [candidate, baseline, baseline, candidate])
    out: dict[str, str] = {}
    for r in df.itertuples(index=False):
        out.setdefault(str(r.example_id), human_outcome(r.model_1, r.model_2, str(r.human_choice), candidate))
    return out, f"{schema}.{HUMAN_TABLE}: {len(out)} examples compared by people ({candidate} vs {baseline})"


def judge_input(spec, text: str, prompt=None, contexts=()) -> str:
    """The task input as the models saw it (the prompt rendered), which is what the judge is shown."""
    return "\n\n".join(m["content"] for m in build_messages(spec, text, [], prompt, contexts))


def sxs_evaluation(
    context: dg.AssetExecutionContext,
    config: SxsConfig,
    eval_report: dict,
    base_model: dict,
    judge_certificate: dict,
    task: TaskRef,
    judge: JudgeResource,
    warehouse: DuckDBWarehouse,
    mlflow: MlflowTracking,
    home: GenopsHome,
) -> dg.Output[dict]:
    """Side-by-side (AutoSxS) of the candidate against the base model or the champion, judged by
    a model in choice mode in both orders, with win/tie/loss rates and bootstrap intervals,
    position consistency, pointwise rubric scores, judge cost, and an HTML report. Unless
    judge_certificate certifies this judge and pairwise rubric, every number is marked
    UNCERTIFIED (metadata, MLflow tag `genops.judge_certified`, report header) and is no result.
    Where people compared the same two versions (human_judgements), also their agreement with
    the judge and a prediction-powered win rate. Every judge call is cached by content.
    Cost: a few minutes with the local judge."""
    from genops_assets.lib.judge_certificate import judge_trust, trust_tags
    from genops_assets.lib.judging import BUILTIN_RUBRICS, load_rubrics
    from genops_assets.lib.report import write_sxs_report
    from genops_assets.lib.sxs import SxsRow, run_sxs, version_name

    spec = task.load()
    # The judge sees the task as the models saw it: the production prompt, rendered.
    prompt_ref = mlflow.resolve_prompt(spec)
    prompt = prompt_ref.template
    rubrics = load_rubrics(BUILTIN_RUBRICS, spec.root / "rubrics")
    missing = [n for n in [config.pairwise_rubric, *config.pointwise_rubrics] if n not in rubrics]
    if missing:
        raise ValueError(f"unknown rubric(s) {missing}; available: {sorted(rubrics)} "
                         f"(built-in {BUILTIN_RUBRICS}, task {spec.root / 'rubrics'})")
    task_rubrics = [r for r in load_rubrics(spec.root / "rubrics").values() if r.kind == "pointwise"]
    pointwise = [rubrics[n] for n in config.pointwise_rubrics] + [r for r in task_rubrics
                                                                  if r.name not in config.pointwise_rubrics]

    preds: dict[str, dict[str, dict]] = {}
    for _, prediction in iter_jsonl(eval_report["predictions_file"]):
        preds.setdefault(prediction["model"], {})[prediction["example_id"]] = prediction
    cand_label = next(m for m in preds if m.startswith("candidate"))
    base_label = next((m for m in preds if m.startswith(config.baseline)), None)
    if base_label is None:
        raise ValueError(f"baseline '{config.baseline}' was not evaluated in eval_report (models: {sorted(preds)})")
    ids = list(preds[cand_label])
    if config.max_examples:
        ids = ids[: config.max_examples]
    cand_preds = preds[cand_label]
    candidate_name = version_name(spec.name, eval_report["candidate"]["version"])
    baseline_name = (version_name(spec.name, eval_report["champion"]["version"])
                     if config.baseline == "champion" and eval_report.get("champion") else "base")
    human, human_source = human_outcomes(warehouse, spec.name, candidate_name, baseline_name)
    rows = [SxsRow(i, judge_input(spec, cand_preds[i]["input"], prompt, cand_preds[i].get("contexts", ())),
                   json.dumps(cand_preds[i]["reference"], ensure_ascii=False),
                   cand_preds[i]["prediction"], preds[base_label][i]["prediction"], human=human.get(i))
            for i in ids]

    cache = CallCache(home.cache_dir / "calls.sqlite")
    client = judge.connect(base_model["path"], cache=cache, task=spec.name)
    context.log.info(f"AutoSxS: {cand_label} vs {base_label} on {len(rows)} examples, judge {client.model} at "
                     f"{client.base_url}, rubrics {[config.pairwise_rubric] + [r.name for r in pointwise]}")
    pairwise_rubric = rubrics[config.pairwise_rubric]
    certified, trust = judge_trust(judge_certificate, client.model, client.base_url,
                                   f"{pairwise_rubric.name}@{pairwise_rubric.version}")
    (context.log.info if certified else context.log.warning)(trust)
    context.log.info(f"human labels: {human_source}")
    result = run_sxs(client, pairwise_rubric, pointwise, rows, log=context.log.info, seed=config.seed)
    usage = client.usage.as_dict(judge.price_in_per_1k, judge.price_out_per_1k)
    result.summary.update(judge_certified=certified, human_labels_source=human_source)

    run_tags = {"genops.dagster_run_id": context.run.run_id, "genops.kind": "autosxs", **prompt_tags(prompt_ref),
                **trust_tags(certified, judge_certificate)}
    with mlflow.run(f"genops/{spec.name}", f"sxs-{cand_label.replace(' ', '')}", run_tags) as run_id:
        out_dir = home.runs_dir / "sxs" / run_id
        title = f"{spec.name}: AutoSxS {cand_label} vs {base_label}"
        paths = write_sxs_report(out_dir, title if certified else f"UNCERTIFIED JUDGE - {title}", cand_label,
                                 base_label, result.summary, result.rows, usage,
                                 judge_status=None if certified else f"{trust}. The numbers below are shown for "
                                 "inspection only: they are not a result and no gate reads them.")
        metrics = {f"judge_{k}": float(v) for k, v in usage.items()}
        for k in ("win_rate", "tie_rate", "loss_rate", "position_consistency", "preference_margin"):
            if k in result.summary:
                metrics[k] = result.summary[k]["estimate"]
                metrics[f"{k}_low"] = result.summary[k]["low"]
                metrics[f"{k}_high"] = result.summary[k]["high"]
        for name, pointwise_summary in result.summary["pointwise"].items():
            metrics[f"{name}_delta"] = pointwise_summary["delta"]["estimate"]
        ppi = result.summary.get("win_rate_ppi") or {}
        if ppi.get("estimate") is not None:
            metrics.update(win_rate_ppi=ppi["estimate"], win_rate_ppi_low=ppi["low"], win_rate_ppi_high=ppi["high"])
        mlflow.log_params(run_id, {"candidate": cand_label, "baseline": base_label, "judge_model": client.model,
                                   "judge_url": client.base_url, "pairwise_rubric": result.summary["pairwise_rubric"],
                                   "pointwise_rubrics": ",".join(f"{r.name}@{r.version}" for r in pointwise)})
        mlflow.log_metrics(run_id, metrics)
        mlflow.log_artifacts(run_id, out_dir, "sxs")

    s = result.summary
    win = s.get("win_rate")
    mark = "" if certified else "UNCERTIFIED judge, not a result: "
    context.log.info(f"{mark}AutoSxS done: win rate {win['estimate']:.3f} [{win['low']:.3f}, {win['high']:.3f}], "
                     f"consistency {s['position_consistency']['estimate']:.3f}, preference margin "
                     f"{s['preference_margin']['estimate']:+.3f} [{s['preference_margin']['low']:+.3f}, "
                     f"{s['preference_margin']['high']:+.3f}], judge calls {usage['calls']} "
                     f"({usage['cached']} cached, {usage['failures']} failed)" if win else "AutoSxS: no judged pairs")
    value = {"summary": s, "usage": usage, "report_html": str(paths["html"]), "mlflow_run_id": run_id,
             "failures": result.failures[:50], "judge_certified": certified, "judge_status": trust,
             "judge_certificate_run_id": judge_certificate["mlflow_run_id"]}

    def marked(number):
        return None if number is None else {**number, "judge_certified": certified}

    return dg.Output(value, metadata={
        "judge_certified": certified,
        "judge_status": trust,
        "report_html": dg.MetadataValue.path(str(paths["html"])),
        "win_rate": dg.MetadataValue.json(marked(s.get("win_rate"))),
        "win_rate_ppi": dg.MetadataValue.json(s.get("win_rate_ppi") or {"estimate": None,
                                                                          "reason": f"not computed: {human_source}"}),
        "judge_human": dg.MetadataValue.json(s.get("judge_human") or {"n": 0}),
        "position_consistency": dg.MetadataValue.json(marked(s.get("position_consistency"))),
        "preference_margin": dg.MetadataValue.json(marked(s.get("preference_margin"))),
        "pointwise": dg.MetadataValue.json({k: {**v, "judge_certified": certified}
                                            for k, v in (s.get("pointwise") or {}).items()}),
        "judge_usage": dg.MetadataValue.json(usage),
        "failed_rows": len(result.failures),
        "mlflow_run_id": run_id,
        "win_rate_chart": dg.MetadataValue.md(
            png_markdown("win rate", Path(paths["win_rate.png"]).read_bytes())
            if "win_rate.png" in paths else "no judged pairs"),
    })
