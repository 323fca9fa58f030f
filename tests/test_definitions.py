"""The code location loads fast, validates, lists the lifecycle assets, and imports no ML library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
HEAVY = ["torch", "transformers", "peft", "trl", "deepspeed", "great_expectations", "ragas"]
TASK_ASSETS = {"golden_eval_dataset", "sft_dataset", "few_shot_examples", "tuned_adapter", "eval_report",
               "safety_report", "deployed_endpoint", "raw_task_examples", "prompt_templates", "serving_metrics",
               "prompt_drift", "rating_queue", "human_ratings", "preference_pairs", "human_corrections",
               "human_judgements", "golden_proposals", "model_card"}
PII_CHECKS = {"no_pii_golden_eval_dataset", "no_pii_sft_dataset", "no_pii_few_shot_examples", "no_pii_preference_pairs"}
SHARED_ASSETS = {"base_model", "request_log", "resource_usage"}
TASKS = ("support_triage", "product_qa")


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "GENOPS_HOME": str(tmp_path / "home"), "DAGSTER_HOME": str(tmp_path / "dh")}


@pytest.mark.server
def test_loading_definitions_imports_no_heavy_library(tmp_path):
    code = (
        "import sys, json; import genops_assets.definitions as d; "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@pytest.mark.server
def test_dagster_definitions_validate(tmp_path):
    (tmp_path / "dh").mkdir()
    res = subprocess.run([str(Path(sys.executable).with_name("dagster")), "definitions", "validate",
                          "-m", "genops_assets.definitions"], cwd=REPO, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=180, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_asset_graph_has_the_lifecycle_and_gates_of_every_task():
    import dagster as dg

    from genops_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys >= SHARED_ASSETS | {f"{t}/{a}" for t in TASKS for a in TASK_ASSETS}
    # Shared pieces are not copied per task.
    assert not {f"{t}/{a}" for t in TASKS for a in SHARED_ASSETS} & keys
    for task in TASKS:
        upstream = {k.to_user_string() for k in graph.get(dg.AssetKey([task, "tuned_adapter"])).parent_keys}
        assert {"base_model", f"{task}/sft_dataset", f"{task}/prompt_templates"} <= upstream
        assert graph.get(dg.AssetKey([task, "tuned_adapter"])).group_name == f"{task}_tuning"
        checks = {c.name for c in graph.asset_check_keys if c.asset_key.path[0] == task}
        assert checks == {"gx_golden_eval_dataset", "gx_sft_dataset", "gx_few_shot_examples", "beats_champion",
                          "gx_preference_pairs", "gx_human_corrections", "safety_no_regression"} | PII_CHECKS
        for c in graph.asset_check_keys:
            if c.asset_key.path[0] == task and c.name in ("gx_sft_dataset", "beats_champion", "gx_preference_pairs",
                                                          "gx_human_corrections", "safety_no_regression", *PII_CHECKS):
                assert graph.get_check_spec(c).blocking, c
        for job in ("genops_loop", "continuous_training", "prompt_enhancement", "judge_tuning"):
            assert defs.resolve_job_def(f"{task}_{job}")
        loop = {k.to_user_string() for k in defs.resolve_job_def(f"{task}_genops_loop").asset_layer.selected_asset_keys}
        assert f"{task}/deployed_endpoint" in loop and "base_model" in loop
        # The safety report is part of the loop and gates deployment (SFT's and DPO's candidates).
        assert f"{task}/safety_report" in loop and f"{task}/preference_safety_report" not in loop
        for report, deployment in (("safety_report", "deployed_endpoint"),
                                   ("preference_safety_report", "preference_deployed_endpoint")):
            assert dg.AssetKey([task, report]) in graph.get(dg.AssetKey([task, deployment])).parent_keys
        assert f"{task}/model_card" in loop  # every candidate of the loop gets its cards
        # The task's judge is tuned in a job of its own, from the human choices, never in the loop.
        judge_tuning = defs.resolve_job_def(f"{task}_judge_tuning").asset_layer.selected_asset_keys
        assert {k.to_user_string() for k in judge_tuning} == {f"{task}/judge_adapter"}
        assert f"{task}/judge_adapter" not in loop
        judge = graph.get(dg.AssetKey([task, "judge_adapter"]))
        assert judge.group_name == f"{task}_judge_tuning"
        assert {f"{task}/human_judgements", f"{task}/sft_dataset", f"{task}/golden_eval_dataset", "base_model"} <= {
            k.to_user_string() for k in judge.parent_keys}
        assert not {k for k in loop if k.split("/")[0] in set(TASKS) - {task}}, "a loop reaches another task"
        assert defs.resolve_sensor_def(f"{task}_incoming_data_sensor").job_name == f"{task}_continuous_training"
        assert defs.resolve_schedule_def(f"{task}_nightly_training").job_name == f"{task}_continuous_training"


def test_monitoring_partitions_start_at_install(tmp_path):
    """A fresh data directory shows today's partition, not months of empty days; the day is kept."""
    from datetime import UTC, datetime

    import dagster as dg
    from graph_support import load_graph

    home = tmp_path / "home"
    graph = load_graph(home).resolve_asset_graph()
    daily = graph.get(dg.AssetKey(["support_triage", "serving_metrics"])).partitions_def
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert daily.get_partition_keys()[0] == today and len(daily.get_partition_keys()) <= 2
    assert (home / "installed_on").read_text().strip() == today
    (home / "installed_on").write_text("2026-01-05\n")
    again = load_graph(home).resolve_asset_graph().get(dg.AssetKey("resource_usage")).partitions_def
    assert again.get_partition_keys()[0] == "2026-01-05"


def test_workspace_yaml_points_at_the_code_location():
    import tomllib

    ws = yaml.safe_load((REPO / "workspace.yaml").read_text())
    module = ws["load_from"][0]["python_module"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]
    assert module["module_name"] == project["dagster"]["module_name"] == "genops_assets.definitions"
    assert module["location_name"] == project["dagster"]["code_location_name"] == "genops"
    dg_project = project["dg"]["project"]
    assert dg_project["code_location_target_module"] == module["module_name"]
    assert dg_project["code_location_name"] == "genops" and dg_project["defs_module"] == "genops_assets.defs"


def test_dbt_project_has_no_python_package_marker():
    assert not list((REPO / "dbt").rglob("__init__.py"))
