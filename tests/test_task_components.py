"""Every task folder is a GenOpsTask component: graphs side by side in one code location, keyed by
task, a broken folder shown as its error while the others load, and the dg tooling working."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from graph_support import load_graph

REPO = Path(__file__).resolve().parents[1]
TASKS = ("support_triage", "product_qa", "ticket_routing")
PER_TASK = ("raw_task_examples", "sft_dataset", "golden_eval_dataset", "few_shot_examples", "prompt_templates",
            "tuned_adapter", "eval_report", "judge_certificate", "sxs_evaluation", "safety_report", "deployed_endpoint",
            "serving_metrics", "prompt_drift", "online_quality")


def copy_task(src: str, tasks_dir: Path, name: str | None = None) -> Path:
    """The repository's task folder ``src`` copied into ``tasks_dir`` (as task ``name``: data and
    config only, the name in its task.yaml changed)."""
    folder = tasks_dir / (name or src)
    shutil.copytree(REPO / "tasks" / src, folder)
    if name:
        cfg = folder / "task.yaml"
        text = cfg.read_text(encoding="utf-8")
        assert f"name: {src}\n" in text
        cfg.write_text(text.replace(f"name: {src}\n", f"name: {name}\n"), encoding="utf-8")
    return folder


@pytest.fixture()
def three_tasks(tmp_path) -> Path:
    tasks = tmp_path / "tasks"
    copy_task("support_triage", tasks)
    copy_task("product_qa", tasks)
    copy_task("support_triage", tasks, "ticket_routing")
    return tasks


def _keys(defs: dg.Definitions) -> set[str]:
    return {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}


def test_three_task_folders_load_side_by_side(tmp_path, three_tasks):
    defs = load_graph(tmp_path / "home", three_tasks)
    keys = _keys(defs)
    assert keys >= {f"{t}/{a}" for t in TASKS for a in PER_TASK}
    assert keys >= {"base_model", "request_log", "resource_usage"}
    graph = defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey(["ticket_routing", "eval_report"])).group_name == "ticket_routing_evaluation"
    # The third task's marts come from its own raw rows through the shared dbt project.
    parents = graph.get(dg.AssetKey(["ticket_routing", "stg_task_examples"])).parent_keys
    assert parents == {dg.AssetKey(["ticket_routing", "raw_task_examples"])}
    for task in TASKS:
        assert defs.resolve_job_def(f"{task}_genops_loop")
        assert defs.resolve_sensor_def(f"{task}_feedback_labels_sensor")
        assert defs.resolve_schedule_def(f"{task}_nightly_training")


def test_a_new_folder_is_a_new_graph_at_the_next_load(tmp_path, three_tasks):
    home = tmp_path / "home"
    before = _keys(load_graph(home, three_tasks))
    copy_task("product_qa", three_tasks, "catalog_qa")
    after = _keys(load_graph(home, three_tasks))
    assert after - before == {f"catalog_qa/{k.split('/')[1]}" for k in before if k.startswith("product_qa/")}


def _placeholder(defs: dg.Definitions, folder: str):
    return defs.resolve_asset_graph().get(dg.AssetKey([folder, "task_folder"]))


@pytest.mark.parametrize("breakage, message", [
    ("bad_yaml", "not valid YAML"),
    ("missing_file", "does not exist"),
    ("schema_error", "field 'no_such_field' is not a property of output_schema.json"),
    ("no_task_yaml", "needs a task.yaml"),
    ("bad_name", "task name 'broken-task' must match"),
], ids=["bad_yaml", "missing_file", "schema_error", "no_task_yaml", "bad_name"])
def test_a_broken_folder_shows_its_error_and_the_others_load(tmp_path, three_tasks, caplog, breakage, message):
    broken = copy_task("support_triage", three_tasks, "broken_task")
    cfg = broken / "task.yaml"
    if breakage == "bad_yaml":
        cfg.write_text("name: broken_task\ninput_field: [unclosed\n")
    elif breakage == "missing_file":
        (broken / "output_schema.json").unlink()
    elif breakage == "schema_error":
        cfg.write_text(cfg.read_text().replace("label_fields: [category, priority, product]",
                                               "label_fields: [category, priority, no_such_field]"))
    elif breakage == "no_task_yaml":
        cfg.unlink()
    else:
        cfg.write_text(cfg.read_text().replace("name: broken_task\n", "name: broken-task\n"))
    with caplog.at_level("WARNING", logger="genops"):
        defs = load_graph(tmp_path / "home", three_tasks)
    keys = _keys(defs)
    assert keys >= {f"{t}/{a}" for t in TASKS for a in PER_TASK}
    assert {k for k in keys if k.startswith("broken_task/")} == {"broken_task/task_folder"}
    node = _placeholder(defs, "broken_task")
    error = node.metadata["error"].value
    assert message in error and message in node.description
    assert str(broken) in node.description
    assert any("broken_task" in r.getMessage() and message in r.getMessage() for r in caplog.records)
    with pytest.raises(dg.DagsterInvariantViolationError):
        defs.resolve_job_def("broken_task_genops_loop")


def test_two_folders_declaring_one_task_name_are_both_errors(tmp_path, three_tasks):
    copy_task("product_qa", three_tasks, "product_qa_copy")
    cfg = three_tasks / "product_qa_copy" / "task.yaml"
    cfg.write_text(cfg.read_text().replace("name: product_qa_copy\n", "name: product_qa\n"))
    defs = load_graph(tmp_path / "home", three_tasks)
    keys = _keys(defs)
    assert not {k for k in keys if k.startswith("product_qa/") and not k.endswith("/task_folder")}
    for folder in ("product_qa", "product_qa_copy"):
        error = _placeholder(defs, folder).metadata["error"].value
        assert "task name 'product_qa' is declared by more than one folder" in error
    assert keys >= {f"{t}/{a}" for t in ("support_triage", "ticket_routing") for a in PER_TASK}


def test_one_genops_task_instance_builds_one_folder(tmp_path, three_tasks):
    """The component on its own (as a defs.yaml of `type: genops_assets.components.GenOpsTask` would
    declare it): one folder's graph, and a folder that is not there as its error."""
    from graph_support import genops_env

    from genops_assets.components import GenOpsTask

    with genops_env(home=str(tmp_path / "home")):
        built = dg.build_defs_for_component(GenOpsTask(folder="ticket_routing", tasks_dir=str(three_tasks)))
        missing = dg.build_defs_for_component(GenOpsTask(folder="no_such_task", tasks_dir=str(three_tasks)))
    keys = {k.to_user_string() for a in built.assets for k in a.keys}
    assert keys >= {f"ticket_routing/{a}" for a in PER_TASK} and not any(k.startswith("product_qa/") for k in keys)
    assert [k.to_user_string() for a in missing.assets for k in [a.key]] == ["no_such_task/task_folder"]


def test_run_configs_name_steps_by_asset_name():
    from genops_assets.lib.tasks import task_run_config

    written = {"ops": {"eval_report": {"config": {"max_examples": 4}}, "base_model": {"config": {}},
                       "qa__tuned_adapter": {}}, "execution": {"config": {}}}
    assert task_run_config("qa", written) == {
        "ops": {"qa__eval_report": {"config": {"max_examples": 4}}, "base_model": {"config": {}},
                "qa__tuned_adapter": {}}, "execution": {"config": {}}}
    assert task_run_config("qa", {}) == {}


def _cli_env(tmp_path: Path, tasks_dir: Path) -> dict[str, str]:
    (tmp_path / "dh").mkdir(exist_ok=True)
    return {**os.environ, "GENOPS_HOME": str(tmp_path / "home"), "DAGSTER_HOME": str(tmp_path / "dh"),
            "GENOPS_TASKS_DIR": str(tasks_dir), "PYTHONPATH": str(REPO)}


@pytest.mark.server
def test_dagster_asset_list_shows_keys_per_task(tmp_path, three_tasks):
    out = subprocess.run([str(Path(sys.executable).with_name("dagster")), "asset", "list", "-m",
                          "genops_assets.definitions"], cwd=REPO, env=_cli_env(tmp_path, three_tasks),
                         capture_output=True, text=True, timeout=300, check=True).stdout
    listed = {line.strip() for line in out.splitlines() if line.strip()}
    assert listed >= {f"{t}/{a}" for t in TASKS for a in PER_TASK}
    assert {"base_model", "request_log"} <= listed


@pytest.mark.server
def test_dg_check_and_list_defs(tmp_path, three_tasks):
    dg_bin = str(Path(sys.executable).with_name("dg"))
    env = _cli_env(tmp_path, three_tasks)
    check = subprocess.run([dg_bin, "check", "defs"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    listed = subprocess.run([dg_bin, "list", "defs", "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "ticket_routing/eval_report" in listed.stdout and "ticket_routing_genops_loop" in listed.stdout


@pytest.mark.graph
def test_one_tasks_loop_leaves_the_other_tasks_untouched(home, three_tasks, tiny_model_dir):
    """The loop of the task folder the test wrote runs end to end in the three-task code location;
    the other tasks get no materialization, no marts, no model."""
    from graph_support import check_results, free_port, loop_job, make_defs, materialized_keys, tiny_run_config

    from resources import build_resources
    from resources.warehouse import mart_schema

    defs = make_defs(home, free_port(), three_tasks)
    instance = dg.DagsterInstance.ephemeral()
    result = loop_job(defs, "ticket_routing").execute_in_process(
        run_config=tiny_run_config(tiny_model_dir, task="ticket_routing"), instance=instance)
    assert result.success and all(check_results(result).values())
    done = materialized_keys(result)
    assert {"ticket_routing/eval_report", "ticket_routing/deployed_endpoint", "base_model"} <= done
    assert all(k.startswith("ticket_routing/") or "/" not in k for k in done), done
    graph = defs.resolve_asset_graph()
    others = [k for k in graph.get_all_asset_keys() if k.path[0] in ("support_triage", "product_qa")]
    assert others and not [k for k in others if instance.get_latest_materialization_event(k)]
    res = build_resources(home=home)
    warehouse, tracking = res["warehouse"], res["mlflow"]
    assert warehouse.table_exists(mart_schema("ticket_routing"), "sft_dataset")
    for task in ("support_triage", "product_qa"):
        assert not warehouse.table_exists(mart_schema(task), "sft_dataset")
        assert not tracking.client().search_registered_models(f"name = 'genops-{task}'")
    assert tracking.alias("genops-ticket_routing", "champion").version == "1"
