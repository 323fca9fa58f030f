"""Incremental continuous training: a retrain materializes only what new data or new code changed.

The planning rules on a small graph of plain assets (seconds), then the task's loop on the tiny
Llama: a full run, an unchanged nightly tick (no run), and 10% new data that reloads, retrains and
re-evaluates what depends on it and leaves the base model, prompt and ratings alone; which assets
ran is read back from the Dagster event log."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from sensors.incremental import loop_root_versions, plan_run

REPO = Path(__file__).resolve().parents[1]


# -- the planning rules on a small graph --------------------------------------------------------

def small_graph(source: dict, model_code: str = "1", gate_passes: bool = True) -> dg.Definitions:
    """raw (reads ``source``) and prompt are roots; model <- raw, prompt; report <- model, gated;
    deploy <- report. ``model_code`` is the model's code version."""

    @dg.asset(code_version="1")
    def raw():
        return dg.Output(source["raw"], data_version=dg.DataVersion(source["raw"]))

    @dg.asset(code_version="1")
    def prompt():
        return dg.Output("p", data_version=dg.DataVersion("p1"))

    @dg.asset(code_version=model_code)
    def model(raw, prompt):
        return f"{raw}{prompt}"

    @dg.asset
    def report(model):
        return model

    @dg.asset_check(asset=report, blocking=True)
    def beats_champion(report):
        return dg.AssetCheckResult(passed=gate_passes)

    @dg.asset
    def deploy(report):
        return report

    return dg.Definitions(assets=[raw, prompt, model, report, deploy], asset_checks=[beats_champion])


def plan(defs: dg.Definitions, instance, source: dict):
    graph = defs.resolve_asset_graph()
    roots = {dg.AssetKey("raw"): source["raw"], dg.AssetKey("prompt"): "p1"}
    return plan_run(instance, graph, graph.materializable_asset_keys, roots)


def names(keys) -> set[str]:
    return {k.to_user_string() if isinstance(k, dg.AssetKey) else k for k in keys}


def run_all(defs: dg.Definitions, instance) -> dg.ExecuteInProcessResult:
    job = dg.define_asset_job("all", selection=dg.AssetSelection.all())
    return dg.Definitions.merge(defs, dg.Definitions(jobs=[job])).resolve_job_def("all").execute_in_process(
        instance=instance, raise_on_error=False)


def test_first_run_materializes_everything_and_an_unchanged_rerun_nothing():
    instance = dg.DagsterInstance.ephemeral()
    source = {"raw": "r1"}
    defs = small_graph(source)
    first = plan(defs, instance, source)
    assert names(first.selection) == {"raw", "prompt", "model", "report", "deploy"}
    assert set(first.reasons.values()) == {"never materialized"}
    assert run_all(defs, instance).success
    again = plan(defs, instance, source)
    assert again.selection == () and again.held == {}


def test_new_data_in_a_root_reruns_it_and_its_downstream_only():
    instance = dg.DagsterInstance.ephemeral()
    source = {"raw": "r1"}
    defs = small_graph(source)
    run_all(defs, instance)
    source["raw"] = "r2"  # what the root reads changed; it has not run yet
    p = plan(defs, instance, source)
    assert names(p.selection) == {"raw", "model", "report", "deploy"}  # not the unchanged prompt
    assert p.reasons["raw"] == "new data version r2 (was r1)"
    assert p.reasons["model"] == "downstream of raw"
    assert list(p.selection) == [dg.AssetKey(k) for k in ("raw", "model", "report", "deploy")]  # in order
    assert "raw: new data version r2" in p.summary() and "model" not in p.summary()


def test_new_code_version_reruns_that_asset_and_its_downstream():
    instance = dg.DagsterInstance.ephemeral()
    source = {"raw": "r1"}
    run_all(small_graph(source), instance)
    p = plan(small_graph(source, model_code="2"), instance, source)
    assert names(p.selection) == {"model", "report", "deploy"}
    assert p.reasons["model"] == "has a new code version"


def test_a_refused_gate_holds_its_downstream_until_the_checked_asset_changes():
    instance = dg.DagsterInstance.ephemeral()
    source = {"raw": "r1"}
    defs = small_graph(source, gate_passes=False)
    result = run_all(defs, instance)
    assert not result.success  # the blocking check failed: deploy did not run
    assert dg.AssetKey("deploy") not in {e.asset_key for e in result.get_asset_materialization_events()
                                         if e.asset_key}
    p = plan(defs, instance, source)
    # deploy was never materialized, but running it alone would step past the failed gate
    assert p.selection == () and p.held == {"deploy": "beats_champion failed on report's current version"}
    source["raw"] = "r2"  # new data: the report (and its gate) run again, so deploy may follow
    assert names(plan(defs, instance, source).selection) == {"raw", "model", "report", "deploy"}


# -- the task's loop on the tiny model ---------------------------------------------------------

TASK = "support_triage"
UPSTREAM_UNCHANGED = {"base_model", f"{TASK}/prompt_templates", f"{TASK}/human_ratings", f"{TASK}/rating_items",
                      f"{TASK}/rater_quality", f"{TASK}/item_agreement", f"{TASK}/human_corrections"}
DEPEND_ON_DATA = {f"{TASK}/{n}" for n in ("raw_task_examples", "stg_task_examples", "sft_dataset",
                                          "golden_eval_dataset", "few_shot_examples", "tuned_adapter", "eval_report",
                                          "safety_report", "deployed_endpoint")}


def materialized_in(instance, run_id: str) -> set[str]:
    return {e.asset_materialization.asset_key.to_user_string()
            for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)}


def steps_of(instance, run_id: str) -> set[str]:
    return {e.step_key for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)}


@pytest.fixture()
def instance():
    """An instance on disk with a reference to itself, as schedules are evaluated with."""
    with dg.instance_for_test() as inst:
        yield inst


@pytest.mark.graph
def test_retrain_runs_only_what_new_data_changes(home, tiny_model_dir, tmp_path, instance):
    from graph_support import free_port, genops_env, graph_definitions, tiny_run_config

    from genops_assets.lib.jsonl import read_jsonl
    from genops_assets.lib.tasks import TaskRef
    from resources import build_resources
    from resources.automation import AutomationResource

    tasks = tmp_path / "tasks"
    shutil.copytree(REPO / "tasks" / TASK, tasks / TASK, ignore=shutil.ignore_patterns("incoming"))
    (tasks / TASK / "incoming").mkdir()
    run_config = tiny_run_config(tiny_model_dir, steps=2)
    # Every train example counts in the training data's digest (not the first few): new rows are new data.
    run_config["ops"][f"{TASK}__tuned_adapter"]["config"]["max_train_examples"] = None
    config_file = tmp_path / "ct_run_config.yaml"
    config_file.write_text(yaml.safe_dump(run_config))
    with genops_env(home=str(home), tasks_dir=str(tasks)):
        # Values kept on disk between runs, as the deployed instance keeps them (a run of a subset
        # reads the unchanged upstream values the last run stored).
        resources = {**build_resources(home=home, port=free_port(), judge_port=free_port()),
                     "automation": AutomationResource(run_config_file=str(config_file)),
                     "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "storage"))}
        defs = dg.Definitions.merge(graph_definitions(), dg.Definitions(resources=resources))
    job = defs.resolve_job_def(f"{TASK}_continuous_training")
    repo = defs.get_repository_def()
    sensing = {k: resources[k] for k in ("home", "automation", "mlflow")}  # what the sensors and schedule use

    started = time.monotonic()
    full = job.execute_in_process(run_config=run_config, instance=instance)
    full_s = time.monotonic() - started
    assert full.success
    assert materialized_in(instance, full.run_id) >= UPSTREAM_UNCHANGED | DEPEND_ON_DATA

    # Unchanged: the nightly tick plans nothing and starts no run, in under 5% of the full run.
    nightly = defs.resolve_schedule_def(f"{TASK}_nightly_training")
    started = time.monotonic()
    tick = nightly.evaluate_tick(dg.build_schedule_context(instance=instance, resources=sensing,
                                                           repository_def=repo))
    tick_s = time.monotonic() - started
    assert not tick.run_requests and "nothing changed" in tick.skip_message
    assert tick_s <= 0.05 * full_s, (tick_s, full_s)

    # 10% new data: the incoming-data sensor requests the assets that depend on it, and only those.
    examples = read_jsonl(tasks / TASK / "examples.jsonl")
    extra = [{**row, "message": f"{row['message']} (sent again from ticket portal, case {i})"}
             for i, row in enumerate(examples[: max(1, len(examples) // 10)])]
    (tasks / TASK / "incoming" / "batch1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in extra))
    sensor = defs.resolve_sensor_def(f"{TASK}_incoming_data_sensor")
    result = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, resources=sensing,
                                                          repository_def=repo))
    [request] = result.run_requests
    selected = names(request.asset_selection)
    assert selected >= DEPEND_ON_DATA and not (UPSTREAM_UNCHANGED & selected), selected
    assert "raw_task_examples: new data version" in request.tags["genops/changed"]
    retrain = job.execute_in_process(run_config=request.run_config, instance=instance,
                                     asset_selection=request.asset_selection, tags=request.tags)
    assert retrain.success
    ran = materialized_in(instance, retrain.run_id)
    assert ran == selected
    assert not any(s in steps_of(instance, retrain.run_id) for s in ("base_model", f"{TASK}__prompt_templates"))
    # it trained on the new rows (a new registered version), and its gate ran in the same run
    adapters = [m for m in instance.all_logs(retrain.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
                if m.asset_materialization.asset_key == dg.AssetKey([TASK, "tuned_adapter"])]
    meta = adapters[0].asset_materialization.metadata
    assert "reused" not in meta and meta["steps"].value == 2 and meta["version"].value == "2"
    checks = {e.event_specific_data.asset_check_key.name
              for e in retrain.all_events if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION}
    assert "beats_champion" in checks

    # and after it, nothing is left to do
    graph = repo.asset_graph
    spec = TaskRef(TASK, str(tasks)).load()
    roots = loop_root_versions(spec, resources["home"], resources["mlflow"], run_config)
    assert plan_run(instance, graph, job.asset_layer.selected_asset_keys, roots).selection == ()
