"""Continuous-training sensor decisions, built with build_sensor_context over cursor scenarios."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest

from genops_assets.lib.tasks import TaskRef
from resources.automation import AutomationResource
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking
from sensors.incoming import build_incoming_automation

REPO = Path(__file__).resolve().parents[1]
ROW = {"message": "my doorbell chime stopped ringing", "category": "technical_issue", "priority": "medium",
       "product": "doorbell", "summary": "Customer says the doorbell chime stopped ringing."}


@pytest.fixture()
def task(tmp_path):
    dst = tmp_path / "tasks" / "support_triage"
    shutil.copytree(REPO / "tasks" / "support_triage", dst, ignore=shutil.ignore_patterns("incoming"))
    (dst / "incoming").mkdir()
    return TaskRef("support_triage", str(tmp_path / "tasks")), dst / "incoming"


def code_location_graph() -> dg.Definitions:
    """The code location (the test passes its own resources): the sensor plans its runs over its graph."""
    from genops_assets.definitions import defs

    return defs


def _tick(task_ref, cursor=None, automation=None):
    home = Path(task_ref.tasks_dir).parent / "home"
    resources = {"automation": automation or AutomationResource(), "home": GenopsHome(root=str(home)),
                 "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
                                          artifact_root=(home / "artifacts").as_uri())}
    ctx = dg.build_sensor_context(cursor=cursor, resources=resources, instance=dg.DagsterInstance.ephemeral(),
                                  definitions=code_location_graph())
    sensor, _ = build_incoming_automation(task_ref)
    return sensor(ctx), ctx


def test_empty_incoming_skips(task):
    res, _ = _tick(task[0])
    assert isinstance(res, dg.SkipReason)


def test_new_file_requests_one_run_and_same_content_none(task):
    task_res, incoming = task
    (incoming / "batch1.jsonl").write_text(json.dumps(ROW) + "\n")
    res, _ = _tick(task_res)
    assert isinstance(res, dg.SensorResult) and len(res.run_requests) == 1
    run_key, cursor = res.run_requests[0].run_key, res.cursor
    assert cursor in run_key and res.run_requests[0].tags["genops/task"] == "support_triage"

    again, _ = _tick(task_res, cursor=cursor)
    assert isinstance(again, dg.SkipReason)

    # touching the file without changing its content changes nothing
    (incoming / "batch1.jsonl").write_text(json.dumps(ROW) + "\n")
    assert isinstance(_tick(task_res, cursor=cursor)[0], dg.SkipReason)

    # changed content -> a new run with a new key
    (incoming / "batch1.jsonl").write_text(json.dumps({**ROW, "priority": "high"}) + "\n")
    changed, _ = _tick(task_res, cursor=cursor)
    assert isinstance(changed, dg.SensorResult) and changed.run_requests[0].run_key != run_key


def test_non_data_files_are_ignored(task):
    task_res, incoming = task
    (incoming / "README.txt").write_text("notes")
    assert isinstance(_tick(task_res)[0], dg.SkipReason)


def test_nightly_schedule_targets_the_training_job():
    from genops_assets.definitions import defs

    for task in ("support_triage", "product_qa"):
        sched = defs.resolve_schedule_def(f"{task}_nightly_training")
        assert sched.job_name == f"{task}_continuous_training" and sched.cron_schedule == "0 2 * * *"


def test_request_log_sensor_ingests_each_new_size_once(tmp_path, monkeypatch):
    from sensors.requests import request_log_sensor

    home = GenopsHome(root=str(tmp_path))

    def tick(cursor=None):
        return request_log_sensor(dg.build_sensor_context(cursor=cursor, resources={"home": home}))

    assert isinstance(tick(), dg.SkipReason)  # no log yet
    log = tmp_path / "endpoint" / "requests.jsonl"
    log.write_text('{"request_id": "r1"}\n')
    first = tick()
    assert isinstance(first, dg.SensorResult)
    # The request names no job, so the sensor's own job runs it: ingest_requests, which loads request_log.
    assert first.run_requests[0].job_name is None and request_log_sensor.job_name == "ingest_requests"
    from genops_assets.definitions import defs

    job = defs.resolve_job_def(request_log_sensor.job_name)
    assert job.asset_layer.executable_asset_keys == {dg.AssetKey("request_log")}
    assert isinstance(tick(first.cursor), dg.SkipReason)
    with open(log, "a") as fh:
        fh.write('{"request_id": "r2"}\n')
    second = tick(first.cursor)
    assert isinstance(second, dg.SensorResult) and second.run_requests[0].run_key != first.run_requests[0].run_key


def test_the_ct_run_config_file_reaches_every_retrain(tmp_path, task):
    cfg = tmp_path / "ct.yaml"
    cfg.write_text("ops:\n  eval_report:\n    config:\n      max_examples: 40\n")
    automation = AutomationResource(run_config_file=str(cfg))
    task_res, incoming = task
    (incoming / "batch1.jsonl").write_text(json.dumps(ROW) + "\n")
    res, _ = _tick(task_res, automation=automation)
    # Written with the bare step name; the task's job names it support_triage__eval_report.
    assert res.run_requests[0].run_config == {"ops": {"support_triage__eval_report": {"config": {"max_examples": 40}}}}
    cfg.write_text("- not a mapping\n")
    with pytest.raises(ValueError, match=r"GENOPS_CT_RUN_CONFIG=.*ct.yaml: the run config must be a mapping"):
        automation.run_config()
