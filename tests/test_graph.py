"""The whole asset graph, materialized in-process on a tiny random Llama (seconds), with the
real dbt, Great Expectations, MLflow store and HTTP endpoint."""

from __future__ import annotations

import math

import dagster as dg
from graph_support import check_results, free_port, make_defs, materialized, tiny_run_config
from openai import OpenAI



def same_numbers(a, b) -> bool:
    """Equal structures whose floats agree to 1e-6. Two identical judge prompts judged in one
    run (base and candidate answered alike) can land in differently composed batches, with or
    without a cached prefix, and differ in the last float digits; the cache then holds one."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_numbers(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_numbers(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
    return a == b


def test_whole_loop_then_idempotent_rerun(home, tiny_model_dir):
    port = free_port()
    defs = make_defs(home, port)
    job = defs.resolve_job_def("genops_loop")
    instance = dg.DagsterInstance.ephemeral()
    result = job.execute_in_process(run_config=tiny_run_config(tiny_model_dir), instance=instance)
    assert result.success
    assert {"raw_task_examples", "golden_eval_dataset", "sft_dataset", "few_shot_examples", "base_model",
            "tuned_adapter", "eval_report", "sxs_evaluation", "deployed_endpoint"} <= materialized(result)
    checks = check_results(result)
    assert checks["gx_sft_dataset"] and checks["gx_golden_eval_dataset"] and checks["beats_champion"]
    # A task without retrieved contexts: no RAG metrics, no judge calls from the evaluation.
    assert result.output_for_node("eval_report")["rag"] is None
    assert "rag" not in result.asset_materializations_for_node("eval_report")[0].metadata

    adapter = result.output_for_node("tuned_adapter")
    deployed = result.output_for_node("deployed_endpoint")
    # The server starts with the candidate as `challenger`; `champion` is hot-loaded after parity.
    assert deployed["action"] == "reloaded" and deployed["version"] == adapter["version"] == "1"
    assert deployed["parity"]["checked"] == 4 and deployed["parity"]["matched"] == 4

    from resources import build_resources

    tracking = build_resources(home=home)["mlflow"]
    assert tracking.alias("genops-support_triage", "champion").version == "1"
    mv = tracking.get_version("genops-support_triage", "1")
    for tag in ("genops.base_model_digest", "genops.train_digest", "genops.dagster_run_id", "genops.code_version"):
        assert mv.tags[tag]
    run = tracking.client().get_run(adapter["run_id"])
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["support_triage-sft-train", "support_triage-sft-validation"]
    assert "train_loss" in run.data.metrics

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    assert {m.id for m in client.models.list().data} >= {"base", "champion", "challenger"}

    # Same data, config and base model: no second training, no new version, deploy is a no-op.
    again = job.execute_in_process(run_config=tiny_run_config(tiny_model_dir), instance=instance)
    assert again.success
    assert again.output_for_node("tuned_adapter")["version"] == "1"
    assert again.output_for_node("deployed_endpoint")["action"] == "unchanged"
    # Unchanged evaluation and judging: everything comes from the call cache.
    assert result.output_for_node("eval_report")["model_calls"] > 0
    assert again.output_for_node("eval_report")["model_calls"] == 0
    sxs = again.output_for_node("sxs_evaluation")
    assert sxs["usage"]["calls"] == 0 and sxs["usage"]["cached"] > 0
    assert same_numbers(sxs["summary"], result.output_for_node("sxs_evaluation")["summary"])
    assert not same_numbers({"x": 1.0}, {"x": 1.001})
    assert len(tracking.client().search_model_versions("name = 'genops-support_triage'")) == 1


def test_gate_failure_blocks_deployment(home, tiny_model_dir):
    defs = make_defs(home, free_port())
    cfg = tiny_run_config(tiny_model_dir, margin=2.0)  # impossible margin: metrics are in [0, 1]
    result = defs.resolve_job_def("genops_loop").execute_in_process(
        run_config=cfg, instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success
    assert check_results(result)["beats_champion"] is False
    assert "deployed_endpoint" not in materialized(result)
    from resources import build_resources

    assert build_resources(home=home)["mlflow"].alias("genops-support_triage", "champion") is None
