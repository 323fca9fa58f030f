"""The preference tuning job of the code location, in-process on the tiny Llama: after the loop
has deployed an SFT champion, DPO on preference pairs goes through the same evaluation, gate
and deployment, and the endpoint serves the tuned adapter as the new champion."""

from __future__ import annotations

import dagster as dg
import pytest
from graph_support import (
    REPO,
    TINY_SAFETY,
    check_results,
    free_port,
    loop_job,
    make_defs,
    materialized,
    node,
    tiny_run_config,
)
from test_preference import champion_pairs
from test_preference_asset import TINY, write_pairs

from genops_assets.defs.jobs import preference_tuning_job_name
from genops_assets.lib.tasks import TaskRef, load_task, task_run_config
from resources import build_resources

pytestmark = pytest.mark.graph

TASK = "support_triage"


def test_preference_job_evaluates_gates_and_deploys_like_sft(home, tiny_model_dir):
    port = free_port()
    defs = make_defs(home, port)
    instance = dg.DagsterInstance.ephemeral()
    loop = loop_job(defs)
    # The SFT champion: the loop up to deployment (gate open), without the side-by-side judging.
    deploy = dg.AssetSelection.assets(dg.AssetKey([TASK, "deployed_endpoint"])).upstream().resolve(
        loop.asset_layer.asset_graph)
    steps = {node(k.path[-1]) for k in deploy}
    ops = tiny_run_config(tiny_model_dir, margin=-1.0)["ops"]
    first = loop.execute_in_process(run_config={"ops": {k: v for k, v in ops.items() if k in steps}},
                                    instance=instance, asset_selection=list(deploy))
    assert first.success
    sft = first.output_for_node(node("tuned_adapter"))
    tracking = build_resources(home=home)["mlflow"]
    assert tracking.alias(f"genops-{TASK}", "champion").version == sft["version"] == "1"

    spec = load_task(REPO / "tasks", TASK)
    write_pairs(build_resources(home=home)["warehouse"], champion_pairs(spec, tiny_model_dir, sft["adapter_dir"]))
    job = defs.resolve_job_def(preference_tuning_job_name(TASK))
    assert {k.path[-1] for k in job.asset_layer.executable_asset_keys} >= {
        "preference_tuned_adapter", "preference_eval_report", "preference_safety_report",
        "preference_deployed_endpoint"}
    # The marts the job rebuilds come from ratings; here the pairs were written directly.
    selection = (dg.AssetSelection.groups(f"{TASK}_preference") | dg.AssetSelection.assets("base_model")).resolve(
        job.asset_layer.asset_graph)
    run_config = task_run_config(TASK, {"ops": {
        "base_model": {"config": {"model_path": str(tiny_model_dir)}},
        "preference_tuned_adapter": {"config": TINY},
        "preference_eval_report": {"config": {"max_examples": 4, "batch_size": 4, "margin": -1.0,
                                              "base_few_shot": 0}},
        "preference_safety_report": {"config": TINY_SAFETY},
    }})
    result = job.execute_in_process(run_config=run_config, instance=instance, asset_selection=list(selection))
    assert result.success
    assert {"preference_tuned_adapter", "preference_eval_report", "preference_safety_report",
            "preference_deployed_endpoint"} <= materialized(result)
    assert check_results(result)["beats_champion"]
    assert check_results(result)["safety_no_regression"]
    dpo = result.output_for_node(TaskRef(TASK, "").step("preference_tuned_adapter"))
    report = result.output_for_node(TaskRef(TASK, "").step("preference_eval_report"))
    deployed = result.output_for_node(TaskRef(TASK, "").step("preference_deployed_endpoint"))
    assert dpo["version"] == "2" and dpo["parent_version"] == "1" and dpo["tuning"] == "dpo"
    assert report["champion"]["version"] == "1" and report["gate"]["baseline_role"] == "champion"
    # Served as challenger, parity with the offline evaluation, then promoted to champion.
    assert deployed["version"] == "2" and deployed["previous_champion"] == "1"
    assert deployed["parity"]["checked"] == deployed["parity"]["matched"] > 0
    assert tracking.alias(f"genops-{TASK}", "champion").version == "2"
    assert tracking.get_version(f"genops-{TASK}", "2").tags["genops.tuning"] == "dpo"
