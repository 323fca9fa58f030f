"""The whole asset graph, materialized in-process on a tiny random Llama (seconds), with the
real dbt, Great Expectations, MLflow store and HTTP endpoint."""

from __future__ import annotations

import dagster as dg
import pytest
from graph_support import (
    check_results,
    free_port,
    loop_job,
    make_defs,
    materialized,
    node,
    probe_eval_report,
    same_numbers,
    tiny_run_config,
)
from openai import OpenAI

pytestmark = pytest.mark.graph

# The gate compares the lower bound of the paired interval with the margin; the margins below
# sit this far on either side of the bound measured on the same adapter and golden examples.
MARGIN_STEP = 0.01


def test_whole_loop_then_idempotent_rerun(home, tiny_model_dir):
    port = free_port()
    defs = make_defs(home, port)
    job = loop_job(defs)
    instance = dg.DagsterInstance.ephemeral()
    probe = probe_eval_report(job, instance, tiny_run_config(tiny_model_dir, margin=0.0))
    assert probe["model_calls"] > 0
    low = probe["gate"]["improvement_low"]
    run_config = tiny_run_config(tiny_model_dir, margin=low - MARGIN_STEP)
    result = job.execute_in_process(run_config=run_config, instance=instance)
    assert result.success
    gate = result.output_for_node(node("eval_report"))["gate"]
    assert gate["baseline_name"] == "base model" and gate["improvement_low"] == low
    assert gate["passed"] and gate["margin"] < low
    assert {"raw_task_examples", "golden_eval_dataset", "sft_dataset", "few_shot_examples", "base_model",
            "tuned_adapter", "eval_report", "judge_certificate", "sxs_evaluation",
            "safety_report", "deployed_endpoint"} <= materialized(result)
    # No ratings yet: the local judge is measured on the probe but not certified, and AutoSxS says so.
    certificate = result.output_for_node(node("judge_certificate"))
    assert certificate["certified"] is False and certificate["certificate"]["labels_needed"] == 30
    assert certificate["certificate"]["statistics"]["probe"]["n"] > 0
    assert result.output_for_node(node("sxs_evaluation"))["judge_certified"] is False
    checks = check_results(result)
    assert checks["gx_sft_dataset"] and checks["gx_golden_eval_dataset"] and checks["beats_champion"]
    # People's ratings: none yet. The queue is built (gold questions at least), the feedback
    # tables and marts exist, empty, and their checks pass.
    assert {"rating_queue", "human_ratings", "item_agreement", "preference_pairs", "human_corrections",
            "human_judgements", "golden_proposals"} <= materialized(result)
    assert checks["gx_preference_pairs"] and checks["gx_human_corrections"]
    queue = result.output_for_node(node("rating_queue"))
    assert queue["by_source"]["gold"] >= 2 and queue["items"] == sum(queue["by_source"].values())
    from genops_assets.lib.ratings import RatingStore

    assert len(RatingStore(queue["store"]).items("support_triage")) == queue["items"]
    human = result.asset_materializations_for_node(node("human_ratings"))
    report = next(m for m in human if m.asset_key == dg.AssetKey(["support_triage", "human_ratings"])).metadata
    assert report["kappa"].value == "not computed" and "not computed" in report["agreement_report"].value
    # A task without retrieved contexts: no RAG metrics, no judge calls from the evaluation.
    assert result.output_for_node(node("eval_report"))["rag"] is None
    assert "rag" not in result.asset_materializations_for_node(node("eval_report"))[0].metadata

    adapter = result.output_for_node(node("tuned_adapter"))
    deployed = result.output_for_node(node("deployed_endpoint"))
    # The server starts with the candidate as `challenger`; `champion` is hot-loaded after parity.
    assert deployed["action"] == "reloaded" and deployed["version"] == adapter["version"] == "1"
    assert deployed["parity"]["checked"] == 4 and deployed["parity"]["matched"] == 4

    from resources import build_resources

    tracking = build_resources(home=home)["mlflow"]
    assert tracking.alias("genops-support_triage", "champion").version == "1"
    mv = tracking.get_version("genops-support_triage", "1")
    for tag in ("genops.base_model_digest", "genops.train_digest", "genops.dagster_run_id", "genops.code_version"):
        assert mv.tags[tag]
    # The version is the tuning run's MLflow model, which holds the candidate's golden-set scores.
    assert mv.source == f"models:/{adapter['model_id']}" and mv.run_id == adapter["run_id"]
    assert "candidate.mean_field_exact_match" in {
        m.key for m in tracking.client().get_logged_model(adapter["model_id"]).metrics}
    run = tracking.client().get_run(adapter["run_id"])
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["support_triage-sft-train",
                                                                   "support_triage-sft-validation"]
    assert "train_loss" in run.data.metrics

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    assert {m.id for m in client.models.list().data} >= {"base", "support_triage", "support_triage:challenger"}

    # The shipped data holds no PII; the champion's model and dataset cards are on its training run.
    assert all(checks[f"no_pii_{m}"] for m in ("golden_eval_dataset", "sft_dataset", "few_shot_examples",
                                               "preference_pairs"))
    card = result.output_for_node(node("model_card"))
    assert card["version"] == "1" and mv.tags["genops.model_card_sha256"] == card["sha256"]
    assert {a.path for a in tracking.client().list_artifacts(adapter["run_id"], "cards")} >= {
        "cards/model_card.md", "cards/datasets"}
    # The audit log: who promoted and deployed which version, and why; shown on deployed_endpoint.
    from genops_assets.lib.audit import AuditLog

    audit = AuditLog(build_resources(home=home)["home"].audit_path)
    entries = audit.entries("genops-support_triage")
    assert [(e["action"], e["version"], e["previous"]) for e in entries] == [("deploy", "1", None),
                                                                              ("promote", "1", None)]
    assert {e["actor"] for e in entries} == {f"dagster-run:{result.run_id}"} and "gate" in entries[1]["reason"]
    deployed_meta = result.asset_materializations_for_node(node("deployed_endpoint"))[0].metadata
    assert "| promote | genops-support_triage | 1 |" in deployed_meta["audit_log"].value

    # Same data, config and base model: no second training, no new version, deploy is a no-op.
    again = job.execute_in_process(run_config=run_config, instance=instance)
    assert again.success
    assert again.output_for_node(node("tuned_adapter"))["version"] == "1"
    assert again.output_for_node(node("deployed_endpoint"))["action"] == "unchanged"
    # Unchanged evaluation and judging: everything comes from the call cache.
    assert result.output_for_node(node("eval_report"))["model_calls"] == 0  # answered in the probe
    assert again.output_for_node(node("eval_report"))["model_calls"] == 0
    sxs = again.output_for_node(node("sxs_evaluation"))
    assert sxs["usage"]["calls"] == 0 and sxs["usage"]["cached"] > 0
    assert same_numbers(sxs["summary"], result.output_for_node(node("sxs_evaluation"))["summary"])
    assert len(tracking.client().search_model_versions("name = 'genops-support_triage'")) == 1
    assert len(audit.entries()) == 2  # a no-op deploy is not an event


def test_gate_failure_blocks_deployment(home, tiny_model_dir):
    defs = make_defs(home, free_port())
    job = loop_job(defs)
    instance = dg.DagsterInstance.ephemeral()
    low = probe_eval_report(job, instance, tiny_run_config(tiny_model_dir, margin=0.0))["gate"]["improvement_low"]
    cfg = tiny_run_config(tiny_model_dir, margin=low + MARGIN_STEP)
    result = job.execute_in_process(run_config=cfg, instance=instance, raise_on_error=False)
    assert not result.success
    gate = result.output_for_node(node("eval_report"))["gate"]
    assert gate["baseline_name"] == "base model" and gate["improvement_low"] == low
    assert not gate["passed"] and "lower bound vs margin" in gate["reason"]
    assert check_results(result)["beats_champion"] is False
    assert "deployed_endpoint" not in materialized(result)
    from resources import build_resources

    assert build_resources(home=home)["mlflow"].alias("genops-support_triage", "champion") is None
