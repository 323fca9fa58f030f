"""AutoSxS: the judge compares the candidate with a baseline on the golden set, both orders."""

import json
from pathlib import Path

import dagster as dg

from genops_assets.defs.evaluation.config import SxsConfig
from genops_assets.lib.cache import CallCache
from genops_assets.lib.formatting import build_messages
from genops_assets.lib.jsonl import iter_jsonl
from genops_assets.lib.prompts import PromptError
from genops_assets.lib.report import png_markdown
from genops_assets.lib.tasks import TaskRef
from resources.judge import JudgeResource
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking, prompt_tags


def _judge_human_agreement(client, rubric, path: Path, spec, log, seed: int, prompt=None) -> dict:
    """Judge the human-labelled pairs of the task (both orders) and compare with the people."""
    from genops_assets.lib.sxs import SxsRow, run_sxs

    label = {"A": "win", "B": "loss", "C": "tie"}
    rows = []
    for line_no, pair in iter_jsonl(path):
        try:
            judge_input = _judge_input(spec, pair["input"], prompt, pair.get("contexts") or ())
            rows.append(SxsRow(f"human_{line_no}", judge_input, pair.get("reference", ""), pair["response_a"],
                               pair["response_b"], human=label[pair["preferred"]]))
        except (KeyError, TypeError, PromptError) as exc:
            raise ValueError(f"{path}, row {line_no}: expected input, response_a, response_b and preferred "
                             f"(A, B or C), and contexts for a task with retrieved contexts: {exc}") from exc
    result = run_sxs(client, rubric, [], rows, log=log, seed=seed)
    return result.summary.get("judge_human", {"n": 0})


def _judge_input(spec, text: str, prompt=None, contexts=()) -> str:
    return "\n\n".join(m["content"] for m in build_messages(spec, text, [], prompt, contexts))


def sxs_evaluation(
    context: dg.AssetExecutionContext,
    config: SxsConfig,
    eval_report: dict,
    base_model: dict,
    task: TaskRef,
    judge: JudgeResource,
    mlflow: MlflowTracking,
    home: GenopsHome,
) -> dg.Output[dict]:
    """Side-by-side (AutoSxS) of the candidate against the base model or the champion, judged by
    a model in choice mode in both orders, with win/tie/loss rates and bootstrap intervals,
    position consistency, pointwise rubric scores, judge cost, and an HTML report. Every judge
    call is cached by content. Cost: a few minutes with the local judge."""
    from genops_assets.lib.judging import BUILTIN_RUBRICS, load_rubrics
    from genops_assets.lib.report import write_sxs_report
    from genops_assets.lib.sxs import SxsRow, run_sxs

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
    rows = [SxsRow(i, _judge_input(spec, cand_preds[i]["input"], prompt, cand_preds[i].get("contexts", ())),
                   json.dumps(cand_preds[i]["reference"], ensure_ascii=False),
                   cand_preds[i]["prediction"], preds[base_label][i]["prediction"]) for i in ids]

    cache = CallCache(home.cache_dir / "calls.sqlite")
    client = judge.connect(base_model["path"], cache=cache, task=spec.name)
    context.log.info(f"AutoSxS: {cand_label} vs {base_label} on {len(rows)} examples, judge {client.model} at "
                     f"{client.base_url}, rubrics {[config.pairwise_rubric] + [r.name for r in pointwise]}")
    result = run_sxs(client, rubrics[config.pairwise_rubric], pointwise, rows, log=context.log.info, seed=config.seed)
    usage = client.usage.as_dict(judge.price_in_per_1k, judge.price_out_per_1k)

    run_tags = {"genops.dagster_run_id": context.run.run_id, "genops.kind": "autosxs", **prompt_tags(prompt_ref)}
    with mlflow.run(f"genops/{spec.name}", f"sxs-{cand_label.replace(' ', '')}", run_tags) as run_id:
        out_dir = home.runs_dir / "sxs" / run_id
        paths = write_sxs_report(out_dir, f"{spec.name}: AutoSxS {cand_label} vs {base_label}", cand_label,
                                 base_label, result.summary, result.rows, usage)
        metrics = {f"judge_{k}": float(v) for k, v in usage.items()}
        for k in ("win_rate", "tie_rate", "loss_rate", "position_consistency", "preference_margin"):
            if k in result.summary:
                metrics[k] = result.summary[k]["estimate"]
                metrics[f"{k}_low"] = result.summary[k]["low"]
                metrics[f"{k}_high"] = result.summary[k]["high"]
        for name, pointwise_summary in result.summary["pointwise"].items():
            metrics[f"{name}_delta"] = pointwise_summary["delta"]["estimate"]
        mlflow.log_params(run_id, {"candidate": cand_label, "baseline": base_label, "judge_model": client.model,
                                   "judge_url": client.base_url, "pairwise_rubric": result.summary["pairwise_rubric"],
                                   "pointwise_rubrics": ",".join(f"{r.name}@{r.version}" for r in pointwise)})
        mlflow.log_metrics(run_id, metrics)
        mlflow.log_artifacts(run_id, out_dir, "sxs")

    s = result.summary
    human_file = spec.root / "human_preferences.jsonl"
    if human_file.is_file():
        s["judge_human"] = _judge_human_agreement(client, rubrics[config.pairwise_rubric], human_file, spec,
                                                  context.log.info, config.seed, prompt)
    win = s.get("win_rate")
    context.log.info(f"AutoSxS done: win rate {win['estimate']:.3f} [{win['low']:.3f}, {win['high']:.3f}], "
                     f"consistency {s['position_consistency']['estimate']:.3f}, preference margin "
                     f"{s['preference_margin']['estimate']:+.3f} [{s['preference_margin']['low']:+.3f}, "
                     f"{s['preference_margin']['high']:+.3f}], judge calls {usage['calls']} "
                     f"({usage['cached']} cached, {usage['failures']} failed)" if win else "AutoSxS: no judged pairs")
    value = {"summary": s, "usage": usage, "report_html": str(paths["html"]), "mlflow_run_id": run_id,
             "failures": result.failures[:50]}
    return dg.Output(value, metadata={
        "report_html": dg.MetadataValue.path(str(paths["html"])),
        "win_rate": dg.MetadataValue.json(s.get("win_rate")),
        "position_consistency": dg.MetadataValue.json(s.get("position_consistency")),
        "preference_margin": dg.MetadataValue.json(s.get("preference_margin")),
        "pointwise": dg.MetadataValue.json(s.get("pointwise")),
        "judge_usage": dg.MetadataValue.json(usage),
        "failed_rows": len(result.failures),
        "mlflow_run_id": run_id,
        "win_rate_chart": dg.MetadataValue.md(
            png_markdown("win rate", Path(paths["win_rate.png"]).read_bytes())
            if "win_rate.png" in paths else "no judged pairs"),
    })
