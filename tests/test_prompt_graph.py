"""Prompt versions through the asset graph on the tiny model: registered once, resolved by alias
by tuning, evaluation and serving, each recording the version; then enhancement with a
scripted teacher (an outside-boundary stand-in for the teacher LLM service) that scores
candidates on the validation split only, and the eval report's prompt comparison."""

from __future__ import annotations

import dagster as dg
import duckdb
import pytest
from graph_support import TASK, free_port, load_graph, node, select, task_selection, tiny_run_config
from judge_standin import StandInJudge, completion

from genops_assets.lib.prompts import CANDIDATE, PRODUCTION
from resources import build_resources
from resources.judge import JudgeResource

pytestmark = pytest.mark.graph

PROMPT = "genops-support_triage-prompt"


def teacher_script(n, body):
    seed = body.get("seed")
    return 200, completion(f"- Rule {seed}: a refund question is returns_refunds.\n- Rule {seed}: outages are urgent.")


def test_prompt_versions_flow_through_the_graph_and_enhancement_uses_validation_only(home, tiny_model_dir):
    port = free_port()
    with StandInJudge(teacher_script, free_port()) as teacher:
        res = build_resources(home=home, port=port, judge_port=free_port())
        res["judge"] = JudgeResource(base_url=teacher.url, model="teacher")
        defs = load_graph(home)
        assets = list(defs.assets) + list(defs.asset_checks)
        instance = dg.DagsterInstance.ephemeral()
        cfg = tiny_run_config(tiny_model_dir)
        cfg["ops"].pop(node("sxs_evaluation"))
        cfg["ops"].pop(node("judge_certificate"))
        cfg["ops"][node("prompt_candidates")] = {"config": {"n_candidates": 2, "max_examples": 6, "batch_size": 6}}
        # The judge here is the teacher's stand-in: the judged assets (and the queue that reads
        # AutoSxS) are left out, so the teacher's calls are enhancement's alone.
        selection = task_selection(TASK) - select("sxs_evaluation", "rating_queue", "judge_certificate")
        result = dg.materialize(assets, instance=instance, resources=res, run_config=cfg, selection=selection)
        assert result.success

        tracking = res["mlflow"]
        templates = result.output_for_node(node("prompt_templates"))
        assert templates["production"]["version"] == 1 and templates["created"]
        # Every consumer recorded the version it used.
        adapter = result.output_for_node(node("tuned_adapter"))
        assert tracking.client().get_run(adapter["run_id"]).data.tags["genops.prompt_version"] == "1"
        assert tracking.get_version("genops-support_triage", adapter["version"]).tags["genops.prompt_version"] == "1"
        report = result.output_for_node(node("eval_report"))
        assert tracking.client().get_run(report["mlflow_run_id"]).data.params["prompt_version"] == "1"
        assert report["prompt"]["version"] == 1 and report["prompt_comparison"] is None
        assert report["base_zero_shot"]["metrics"] and report["few_shot"]["strategy"] == "nearest"
        deployed = result.output_for_node(node("deployed_endpoint"))
        assert deployed["prompt_version"] == 1 and deployed["served_prompt_version"] == "1"

        # Enhancement: candidates registered with their validation scores, selection on validation rows only.
        enh = result.output_for_node(node("prompt_candidates"))
        assert teacher.calls == 2
        assert [c["skip_reason"] for c in enh["candidates"]] == [None, None]
        with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as con:
            val = {r[0] for r in con.execute(f"select example_id from marts_{TASK}.sft_dataset "
                                             "where split = 'validation'").fetchall()}
            golden = {r[0] for r in con.execute(f"select example_id from marts_{TASK}.golden_eval_dataset").fetchall()}
        assert set(enh["selection_example_ids"]) <= val and not set(enh["selection_example_ids"]) & golden
        versions = tracking.prompt_versions(PROMPT, "message")
        assert [v.version for v in versions] == [1, 2, 3]
        for v in versions[1:]:
            assert v.tags["genops.source"] == "enhancement" and "genops.validation.mean_field_exact_match" in v.tags
            assert "Rule" in v.template.system
        run = tracking.client().get_run(enh["mlflow_run_id"])
        assert run.data.params["selection_split"] == "validation"
        assert {"production.mean_field_exact_match", "v2.mean_field_exact_match"} <= set(run.data.metrics)
        # A random tiny model cannot show a real improvement: nothing is promoted.
        assert enh["promoted"] is False
        assert tracking.prompt_alias(PROMPT, CANDIDATE, "message") is None

        # Rerun: the same text registers nothing new; a candidate alias brings the comparison into the report.
        tracking.set_prompt_alias(PROMPT, CANDIDATE, 3)
        keep = {node(n) for n in ("base_model", "tuned_adapter", "eval_report")}
        again = dg.materialize(assets, instance=instance, resources=res,
                               run_config={"ops": {k: v for k, v in cfg["ops"].items() if k in keep}},
                               selection=select("prompt_templates", "base_model", "tuned_adapter", "eval_report"))
        assert again.success
        assert again.output_for_node(node("prompt_templates"))["created"] is False
        cmp = again.output_for_node(node("eval_report"))["prompt_comparison"]
        assert cmp["production_version"] == 1 and cmp["candidate_version"] == 3 and "+- Rule 1" in cmp["diff"]
        with open(again.output_for_node(node("eval_report"))["report_html"], encoding="utf-8") as fh:
            html = fh.read()
        assert "Prompt comparison" in html and 'class="diff"' in html
        assert tracking.require_prompt_alias(PROMPT, PRODUCTION, "message").version == 1
