"""The whole loop on the retrieval-augmented demo task (product_qa) on the tiny model: passages
flow from the raw files through the marts into training, evaluation, serving and AutoSxS; the
eval report carries context precision / recall and the judged faithfulness / answer relevancy
(a scripted judge stands in for the judge service) in its table, MLflow and Dagster metadata;
a re-run asks the judge nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import dagster as dg
import pytest
from graph_support import check_results, free_port, load_graph, loop_job, node, tiny_run_config
from judge_standin import StandInJudge, completion

from resources import build_resources
from resources.judge import JudgeResource
from resources.warehouse import mart_schema

pytestmark = pytest.mark.graph

QA = "product_qa"


def judge_script(n, body):
    """Pairwise: always a tie. Groundedness: 4 (-> 0.75). Answer relevancy: 3 (-> 0.5)."""
    choices = body["guided_choice"]
    if choices == ["A", "B", "C"]:
        return 200, completion("C", {"C": 1.0})
    system = body["messages"][0]["content"]
    score = "4" if "groundedness" in system else "3"
    return 200, completion(score, {score: 1.0})


def exact_match_retrieval(retrieved: list[str], reference: list[str]) -> tuple[float, float]:
    """Average precision and recall when a passage matches only its exact copy (the demo
    task's reference passages are copies of documentation passages)."""
    verdicts = [int(p in reference) for p in retrieved]
    hits = [sum(verdicts[: i + 1]) / (i + 1) for i, v in enumerate(verdicts) if v]
    precision = sum(hits) / sum(verdicts) if any(verdicts) else 0.0
    return precision, sum(p in retrieved for p in reference) / len(reference)


def test_product_qa_loop_reports_rag_metrics_then_reruns_from_the_cache(home, tiny_model_dir):
    port = free_port()
    with StandInJudge(judge_script, free_port()) as judge:
        res = build_resources(home=home, port=port, judge_port=free_port())
        res["judge"] = JudgeResource(base_url=judge.url, model="judge")
        defs = load_graph(home, resources=res)
        job = loop_job(defs, QA)
        instance = dg.DagsterInstance.ephemeral()
        result = job.execute_in_process(run_config=tiny_run_config(tiny_model_dir, task=QA), instance=instance)
        assert result.success
        assert all(check_results(result).values())

        golden = res["warehouse"].query_df(f"select * from {mart_schema(QA)}.golden_eval_dataset "
                                           "order by example_id").head(4)
        assert golden["contexts_json"].notna().all()
        expected = [exact_match_retrieval(json.loads(r.contexts_json), json.loads(r.reference_contexts_json))
                    for r in golden.itertuples() if isinstance(r.reference_contexts_json, str)]
        assert expected, "the first golden examples have reference passages"

        report = result.output_for_node(node("eval_report", QA))
        rag = report["rag"]
        precision, recall = rag["retrieval"]["context_precision"], rag["retrieval"]["context_recall"]
        assert abs(precision["estimate"] - sum(p for p, _ in expected) / len(expected)) < 1e-6
        assert abs(recall["estimate"] - sum(r for _, r in expected) / len(expected)) < 1e-6
        assert precision["n"] == len(expected) and precision["without_reference"] == 4 - len(expected)
        assert precision["low"] <= precision["estimate"] <= precision["high"]
        cand = report["candidate"]["metrics"]
        assert cand["faithfulness"] == 0.75 and cand["answer_relevancy"] == 0.5
        assert set(rag["models"]) == {"base (0-shot)", "base (1-shot, nearest)", "candidate v1"}
        # two verdicts per example and model; identical answers of two models are judged once
        usage = rag["judge_usage"]
        assert usage["calls"] + usage["cached"] == 3 * 4 * 2 and usage["calls"] > 0 and usage["failures"] == 0

        run = res["mlflow"].client().get_run(report["mlflow_run_id"])
        assert run.data.metrics["candidate.faithfulness"] == 0.75
        assert run.data.metrics["candidate.answer_relevancy_low"] == 0.5
        assert abs(run.data.metrics["retrieval.context_precision"] - precision["estimate"]) < 1e-9
        metadata = result.asset_materializations_for_node(node("eval_report", QA))[0].metadata
        assert metadata["candidate_faithfulness"].value == 0.75
        assert abs(metadata["context_recall"].value - recall["estimate"]) < 1e-9
        assert metadata["rag_judge_failures"].value == 0
        # ROUGE-L of the task's own text field (answer), never a default for another task's field.
        candidate = result.output_for_node(node("eval_report", QA))["candidate"]["metrics"]
        assert metadata["candidate_rouge_l_answer"].value == candidate["rouge_l_answer"]
        assert "candidate_rouge_l_summary" not in metadata and "candidate_rouge_l" not in metadata
        page = Path(report["report_html"]).read_text()
        assert "<td>0.750 [0.750, 0.750]</td>" in page and "Retrieval-augmented generation" in page
        assert "context_precision</td><td colspan=" in page

        predictions = [json.loads(x) for x in Path(report["predictions_file"]).read_text().splitlines()]
        assert all(p["contexts"] and p["faithfulness"] == 0.75 for p in predictions)
        # The endpoint rendered the same prompts, passages included, from prompt variables.
        deployed = result.output_for_node(node("deployed_endpoint", QA))
        assert deployed["parity"]["checked"] == 4 and deployed["parity"]["matched"] == 4
        # AutoSxS and the judge certificate showed the judge the rendered prompt with the passages
        # (the certificate's repeats double every line break, by design).
        pairwise = [b for b in judge.bodies if b["guided_choice"] == ["A", "B", "C"]]
        assert pairwise and all(re.search(r"Documentation passages:\n+\[1\] ", b["messages"][-1]["content"])
                                for b in pairwise)

        asked = judge.calls
        again = job.execute_in_process(run_config=tiny_run_config(tiny_model_dir, task=QA), instance=instance)
        assert again.success
        rerun = again.output_for_node(node("eval_report", QA))
        assert rerun["rag"]["judge_usage"]["calls"] == 0 and rerun["rag"]["judge_usage"]["cached"] == 24
        assert rerun["rag"]["models"] == rag["models"] and rerun["model_calls"] == 0
        assert judge.calls == asked, "nothing reached the judge on the re-run"
