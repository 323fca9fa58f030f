"""Bad data never reaches training: the blocking Great Expectations checks stop the run and
name the failing rows; bad files fail loudly with the file and row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
from graph_support import TASK, check_results, free_port, make_defs, materialized, select, tiny_run_config

pytestmark = pytest.mark.graph

REPO = Path(__file__).resolve().parents[1]
DATA_AND_TUNING = select("raw_task_examples", "stg_task_examples", "golden_eval_dataset", "sft_dataset",
                         "few_shot_examples", "base_model", "tuned_adapter")
CHECKS_AND_TUNING = (dg.AssetSelection.checks_for_assets(*(dg.AssetKey([TASK, m]) for m in (
    "golden_eval_dataset", "sft_dataset", "few_shot_examples"))) | select("base_model", "tuned_adapter"))


@pytest.fixture()
def tasks_dir(tmp_path) -> Path:
    dst = tmp_path / "tasks" / "support_triage"
    shutil.copytree(REPO / "tasks" / "support_triage", dst, ignore=shutil.ignore_patterns("incoming"))
    (dst / "incoming").mkdir()
    return tmp_path / "tasks"


def _run(defs, selection, tiny_model_dir, instance):
    job = dg.define_asset_job("bad_data_probe", selection=selection)
    defs = dg.Definitions.merge(defs, dg.Definitions(jobs=[job]))
    job_def = defs.resolve_job_def("bad_data_probe")
    ops = {k: v for k, v in tiny_run_config(tiny_model_dir)["ops"].items() if job_def.graph.has_node_named(k)}
    return job_def.execute_in_process(run_config={"ops": ops}, instance=instance, raise_on_error=False)


def _failing_rows(result, check_name: str) -> str:
    for e in result.all_events:
        if (e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
                and e.event_specific_data.check_name == check_name):
            return json.dumps({k: v.value if hasattr(v, "value") else str(v)
                               for k, v in e.event_specific_data.metadata.items()}, default=str)
    raise AssertionError(f"no evaluation of {check_name}")


def test_label_outside_schema_or_null_blocks_tuning_and_names_the_row(tmp_path, tasks_dir, tiny_model_dir):
    incoming = tasks_dir / "support_triage" / "incoming" / "bad.jsonl"
    rows = [
        {"message": "The thermostat app logo looks blurry on my tablet screen at night", "category": "cosmetics",
         "priority": "low", "product": "mobile_app", "summary": "Customer reports a blurry logo in the app."},
        {"message": "Please tell me when the camera two-pack goes on sale in Portugal again", "category": None,
         "priority": "low", "product": "camera", "summary": "Customer asks about a camera sale in Portugal."},
    ]
    incoming.write_text("".join(json.dumps(r) + "\n" for r in rows))
    defs = make_defs(tmp_path / "home", free_port(), tasks_dir)
    result = _run(defs, DATA_AND_TUNING, tiny_model_dir, dg.DagsterInstance.ephemeral())
    assert not result.success
    assert "tuned_adapter" not in materialized(result)
    checks = check_results(result)
    assert not all(checks.values())
    failing = "".join(_failing_rows(result, name) for name, ok in checks.items() if not ok)
    assert "cosmetics" in failing or "category" in failing
    import hashlib

    from genops_assets.lib.validation import normalise_text

    ids = {"ex_" + hashlib.sha256(normalise_text(r["message"]).encode()).hexdigest()[:16] for r in rows}
    assert all(i in failing for i in ids), (ids, failing)


@pytest.mark.parametrize("tamper", ["duplicate_id", "golden_in_training"])
def test_tampered_mart_blocks_tuning(tmp_path, tasks_dir, tiny_model_dir, tamper):
    """A broken upstream (a duplicated row, a golden example copied into training) is caught."""
    home = tmp_path / "home"
    defs = make_defs(home, free_port(), tasks_dir)
    instance = dg.DagsterInstance.ephemeral()
    built = _run(defs, select("raw_task_examples", "stg_task_examples", "golden_eval_dataset", "sft_dataset",
                              "few_shot_examples"), tiny_model_dir, instance)
    assert built.success
    from resources import build_resources
    from resources.warehouse import mart_schema

    wh = build_resources(home=home)["warehouse"]
    marts = mart_schema(TASK)
    if tamper == "duplicate_id":
        victim = wh.query_df(f"select example_id from {marts}.sft_dataset order by example_id limit 1").iloc[0, 0]
        wh.execute(f"insert into {marts}.sft_dataset select * from {marts}.sft_dataset where example_id = ?", [victim])
    else:
        victim = wh.query_df(f"select example_id from {marts}.golden_eval_dataset order by example_id "
                             "limit 1").iloc[0, 0]
        cols = wh.query_df(f"select * from {marts}.sft_dataset limit 0").columns.tolist()
        fixed = {"split": "'train'", "origin": "'task_data'"}
        columns = ", ".join(fixed.get(c, c) for c in cols)
        wh.execute(f"insert into {marts}.sft_dataset select {columns} from {marts}.golden_eval_dataset "
                   "where example_id = ?", [victim])
    result = _run(defs, CHECKS_AND_TUNING, tiny_model_dir, instance)
    assert not result.success
    assert check_results(result)["gx_sft_dataset"] is False
    assert "tuned_adapter" not in materialized(result)
    assert victim in _failing_rows(result, "gx_sft_dataset")
