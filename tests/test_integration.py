"""The loop on the real embedded SmolLM2-135M-Instruct, on a small slice (a couple of minutes)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
from graph_support import (
    TASK,
    check_results,
    free_port,
    loop_job,
    make_defs,
    materialized,
    node,
    probe_eval_report,
)
from openai import OpenAI

from genops_assets.lib.tasks import task_run_config
from genops_assets.serving import control

pytestmark = pytest.mark.integration


def test_loop_on_embedded_smollm2(tmp_path):
    home = tmp_path / "home"
    port = free_port()
    defs = make_defs(home, port)  # the judge gets its own free port
    job = loop_job(defs)
    instance = dg.DagsterInstance.ephemeral()

    def run_config(margin: float) -> dict:
        return task_run_config(TASK, {"ops": {
            "tuned_adapter": {"config": {"max_steps": 4, "max_train_examples": 16, "eval_every": 0, "save_every": 2,
                                         "log_every": 1}},
            "eval_report": {"config": {"max_examples": 4, "batch_size": 4, "margin": margin, "base_few_shot": 0}},
            "sxs_evaluation": {"config": {"max_examples": 4}},
            "judge_certificate": {"config": {"max_probe_examples": 4}},
        }})

    try:
        # The gate on the measured improvement: the margin just below the interval's lower bound.
        low = probe_eval_report(job, instance, run_config(0.0))["gate"]["improvement_low"]
        result = job.execute_in_process(run_config=run_config(low - 0.01), instance=instance)
        assert result.success
        assert result.output_for_node(node("eval_report"))["gate"]["improvement_low"] == low
        assert all(check_results(result).values())
        assert "deployed_endpoint" in materialized(result)
        base = result.output_for_node("base_model")
        assert base["parameters"] == 134_515_008 and base["source"].endswith(".gguf")
        assert Path(base["path"], "model.safetensors").is_file()
        adapter = result.output_for_node(node("tuned_adapter"))
        assert Path(adapter["adapter_dir"], "adapter_model.safetensors").is_file()
        assert adapter["steps"] == 4
        assert sorted(p.name for p in (home / "runs" / adapter["version_key"] / "checkpoints").iterdir()) == [
            "checkpoint-2", "checkpoint-4"]
        report = result.output_for_node(node("eval_report"))
        assert Path(report["report_html"]).read_text().count("<img") == 1

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="support_triage", max_tokens=16, temperature=0,
            messages=[{"role": "user", "content": "My doorbell camera is offline since this morning."}])
        assert reply.choices[0].message.content
        assert reply.usage.completion_tokens > 0

        # A second materialization of base_model reuses the converted folder (keyed by the GGUF digest).
        from genops_assets.defs.models.assets import base_model
        from resources import build_resources

        again = dg.materialize([base_model],
                               resources={"home": build_resources(home=home)["home"]},
                               instance=dg.DagsterInstance.ephemeral())
        assert again.output_for_node("base_model")["reused"] is True
        sxs = result.output_for_node(node("sxs_evaluation"))
        assert sxs["summary"]["judged_pairs"] + len([f for f in sxs["failures"] if f["stage"] == "pairwise"]) == 4
        assert Path(sxs["report_html"]).read_text().count("<img") >= 1
    finally:
        control.stop_server(home / "endpoint")
        control.stop_server(home / "judge")
