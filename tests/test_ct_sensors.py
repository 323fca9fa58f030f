"""The sensors that close the continuous-training loop: labelled feedback, prompt drift, online-quality
regression (alert and champion rollback), failed runs, alerts and their webhook."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import dagster as dg
import pytest
from dagster._core.scheduler.instigation import InstigatorType, TickStatus

from genops_assets.lib.alerts import raise_alert, read_alerts
from genops_assets.lib.labels import scan_labels
from genops_assets.lib.tasks import TaskRef
from resources.automation import AutomationResource
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking, RollbackError, registered_model_name
from sensors.feedback import build_feedback_labels_sensor
from sensors.monitoring import build_monitoring_sensors, run_failure_alert_sensor

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
TASK = TaskRef("support_triage", str(REPO / "tasks"))
feedback_labels_sensor = build_feedback_labels_sensor(TASK)
drift_sensor, quality_regression_sensor = build_monitoring_sensors(TASK)


def label(i: int, **over) -> dict:
    row = {"input": f"My thermostat number {i} shows offline since the power cut, please help",
           "output": {"category": "technical_issue", "priority": "high", "product": "thermostat",
                      "summary": f"Thermostat {i} offline after a power cut."},
           "labeler": "ana"}
    row.update(over)
    return row


@pytest.fixture()
def res(home):
    return {"home": GenopsHome(root=str(home)), "automation": AutomationResource(),
            "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
                                     artifact_root=(home / "artifacts").as_uri())}


def code_location_graph() -> dg.Definitions:
    """The code location (the test passes its own resources): the sensor plans its runs over its graph."""
    from genops_assets.definitions import defs

    return defs


def automation(res, **settings) -> dict:
    """``res`` with the automation settings changed (what the GENOPS_* variables would set)."""
    return {**res, "automation": AutomationResource(**settings)}


def write_labels(res, name: str, rows: list, raw_lines: list[str] | None = None, task: str = TASK.name) -> Path:
    folder = res["home"].task_labels_dir(task)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    lines = [json.dumps(r) for r in rows] + list(raw_lines or [])
    path.write_text("".join(line + "\n" for line in lines))
    return path


def labels_tick(res, cursor=None, instance=None):
    ctx = dg.build_sensor_context(cursor=cursor, resources=res, instance=instance or dg.DagsterInstance.ephemeral(),
                                  definitions=code_location_graph())
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    ctx.log.addHandler(Keep())
    return feedback_labels_sensor(ctx), [r.getMessage() for r in records]


# -- labelled feedback ----------------------------------------------------------------------


def test_labels_below_threshold_skip_and_at_threshold_one_run(res):
    # Labels are per task: another task's folder is not this task's feedback.
    write_labels(res, "other.jsonl", [label(i + 100) for i in range(12)], task="product_qa")
    write_labels(res, "batch1.jsonl", [label(i) for i in range(9)])
    skipped, _ = labels_tick(res)
    assert isinstance(skipped, dg.SkipReason)
    assert "9 new" in skipped.skip_message and "threshold 10" in skipped.skip_message

    write_labels(res, "batch2.jsonl", [label(9)])
    got, _ = labels_tick(res)
    assert isinstance(got, dg.SensorResult) and len(got.run_requests) == 1
    req = got.run_requests[0]
    spec = TASK.load()
    digest = scan_labels(res["home"].task_labels_dir(TASK.name), spec).digest
    assert req.run_key == f"feedback_labels:support_triage:{digest}"
    assert req.tags["genops/trigger"] == "feedback_labels"
    assert req.tags["genops/label_rows"] == "10" and req.tags["genops/new_label_rows"] == "10"

    # the same rows again: nothing; the same rows from a lost cursor: the same run key
    again, _ = labels_tick(res, cursor=got.cursor)
    assert isinstance(again, dg.SkipReason) and "0 new" in again.skip_message
    fresh, _ = labels_tick(res)
    assert fresh.run_requests[0].run_key == req.run_key

    # a duplicate of an existing correction (another file, another labeller) is not new
    write_labels(res, "batch3.jsonl", [label(3, labeler="bo")])
    assert isinstance(labels_tick(res, cursor=got.cursor)[0], dg.SkipReason)


def test_threshold_from_settings_and_new_rows_counted_from_cursor(res):
    res = automation(res, label_threshold=2)
    write_labels(res, "a.jsonl", [label(0), label(1)])
    first, _ = labels_tick(res)
    assert len(first.run_requests) == 1
    write_labels(res, "b.jsonl", [label(2)])
    assert isinstance(labels_tick(res, cursor=first.cursor)[0], dg.SkipReason)
    write_labels(res, "b.jsonl", [label(2), label(3)])
    second, _ = labels_tick(res, cursor=first.cursor)
    assert second.run_requests[0].tags["genops/new_label_rows"] == "2"
    assert second.run_requests[0].tags["genops/label_rows"] == "4"
    assert second.run_requests[0].run_key != first.run_requests[0].run_key


def test_invalid_label_lines_are_reported_with_file_and_line(res):
    res = automation(res, label_threshold=2)
    path = write_labels(res, "mixed.jsonl", [label(0)], raw_lines=[
        '{"input": "broken json',                                                      # line 2
        json.dumps(label(1, output={**label(1)["output"], "priority": "asap"})),       # line 3
        json.dumps({"output": label(2)["output"]}),                                    # line 4
        json.dumps({"request_id": "req-42", "output": label(4)["output"]}),            # line 5: valid
        json.dumps(label(5, ouptut={})),                                               # line 6
        json.dumps(label(6, output={k: v for k, v in label(6)["output"].items() if k != "summary"})),  # line 7
    ])
    scan = scan_labels(path.parent, TASK.load())
    assert [(i.line) for i in scan.issues] == [2, 3, 4, 6, 7]
    messages = {i.line: str(i) for i in scan.issues}
    assert messages[2].startswith("mixed.jsonl:2: invalid JSON")
    assert "'priority'" in messages[3] and "'asap'" in messages[3] and "urgent" in messages[3]
    assert "'input' is missing" in messages[4]
    assert "ouptut" in messages[6]
    assert "summary" in messages[7]
    assert [r.line for r in scan.rows] == [1, 5] and scan.rows[1].request_id == "req-42"

    result, logged = labels_tick(res)
    assert len(result.run_requests) == 1  # the two valid rows reach the threshold
    for line in (2, 3, 4, 6, 7):
        assert any(f"{path}:{line}:" in m for m in logged), (line, logged)


# -- prompt drift -----------------------------------------------------------------------------


def materialize(instance, name: str, partition: str, task: str = TASK.name, **metadata):
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=[task, name], partition=partition,
                                                                metadata=metadata))


def drift_tick(res, instance, cursor=None):
    return drift_sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources=res))


def test_drift_requests_retraining_once_per_partition(res):
    instance = dg.DagsterInstance.ephemeral()
    assert isinstance(drift_tick(res, instance), dg.SkipReason)
    # Another task's drift is that task's sensor's business.
    materialize(instance, "prompt_drift", "2026-03-01", task="product_qa", drift=True, flagged_share=0.9)
    assert isinstance(drift_tick(res, instance), dg.SkipReason)
    materialize(instance, "prompt_drift", "2026-03-01", drift=True, flagged_share=0.42)
    got = drift_tick(res, instance)
    assert len(got.run_requests) == 1
    req = got.run_requests[0]
    assert req.run_key.startswith("prompt_drift:2026-03-01:")
    assert req.tags["genops/trigger"] == "prompt_drift" and req.tags["genops/flagged_share"] == "0.42"

    # the same materialization again -> nothing; a re-materialized drifting day -> nothing
    assert isinstance(drift_tick(res, instance, got.cursor), dg.SkipReason)
    materialize(instance, "prompt_drift", "2026-03-01", drift=True, flagged_share=0.5)
    rematerialized = drift_tick(res, instance, got.cursor)
    assert not rematerialized.run_requests
    # no drift on the next day -> nothing; drift on the day after -> a new run
    materialize(instance, "prompt_drift", "2026-03-02", drift=False, flagged_share=0.01)
    quiet = drift_tick(res, instance, rematerialized.cursor)
    assert not quiet.run_requests
    materialize(instance, "prompt_drift", "2026-03-03", drift=True, flagged_share=0.3)
    third = drift_tick(res, instance, quiet.cursor)
    assert [r.tags["genops/drift_partition"] for r in third.run_requests] == ["2026-03-03"]
    assert third.run_requests[0].run_key != req.run_key
    assert read_alerts(res["home"].path) == []


def test_drift_alert_mode_writes_an_alert_and_requests_no_run(res):
    res = automation(res, drift_action="alert")
    instance = dg.DagsterInstance.ephemeral()
    materialize(instance, "prompt_drift", "2026-03-01", drift=True, flagged_share=0.25)
    got = drift_tick(res, instance)
    assert not got.run_requests
    alerts = read_alerts(res["home"].path)
    assert [a["kind"] for a in alerts] == ["prompt_drift"]
    assert alerts[0]["severity"] == "warning" and alerts[0]["details"]["partitions"] == ["2026-03-01"]
    assert "25.0%" in alerts[0]["message"]
    drift_tick(res, instance, got.cursor)
    assert len(read_alerts(res["home"].path)) == 1


def test_drift_without_its_metadata_fails_naming_the_asset(res):
    instance = dg.DagsterInstance.ephemeral()
    materialize(instance, "prompt_drift", "2026-03-01", flagged_share=0.2)
    with pytest.raises(ValueError, match=r"prompt_drift .* no boolean metadata 'drift'"):
        drift_tick(res, instance)


# -- online quality regression and rollback -------------------------------------------------------


@pytest.fixture()
def registry(tmp_path):
    """Two registered adapter versions; v2 is the champion and records v1 as the previous one."""
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                              artifact_root=(tmp_path / "artifacts").as_uri())
    name = registered_model_name("support_triage")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    for previous in ("", "1"):
        run_id = tracking.start_run("genops/support_triage", "sft", {})
        tracking.log_artifacts(run_id, adapter, "adapter")
        tracking.end_run(run_id)
        tracking.register(name, tracking.artifact_uri(run_id, "adapter"), run_id,
                          {"genops.previous_champion": previous})
    tracking.set_alias(name, "champion", "2")
    return tracking, name


def quality_tick(res, registry, instance, cursor=None):
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources={**res, "mlflow": registry[0]})
    return quality_regression_sensor(ctx)


def test_regression_alerts_and_rolls_back_the_champion_when_enabled(res, registry):
    res = automation(res, auto_rollback=True)
    tracking, name = registry
    instance = dg.DagsterInstance.ephemeral()
    materialize(instance, "online_quality", "2026-03-01", regression=False, version="2")
    calm = quality_tick(res, registry, instance)
    assert read_alerts(res["home"].path) == [] and tracking.alias(name, "champion").version == "2"

    materialize(instance, "online_quality", "2026-03-02", regression=True, version="2", accuracy=0.41,
                judge_certified=True)
    got = quality_tick(res, registry, instance, calm.cursor)
    assert tracking.alias(name, "champion").version == "1"
    demoted = tracking.get_version(name, "2")
    assert demoted.tags["genops.rolled_back_to"] == "1" and "2026-03-02" in demoted.tags["genops.rolled_back_reason"]
    [alert] = read_alerts(res["home"].path)
    assert alert["kind"] == "online_quality_regression" and alert["severity"] == "error"
    assert alert["details"]["rollback"]["action"] == "rolled_back"
    assert alert["details"]["rollback"]["from_version"] == "2" and alert["details"]["metadata"]["accuracy"] == 0.41
    assert "champion moved back to v1" in alert["message"]
    from genops_assets.lib.audit import AuditLog

    [entry] = AuditLog(res["home"].audit_path).entries(name)  # the audit log records who and why
    assert (entry["action"], entry["version"], entry["previous"]) == ("rollback", "1", "2")
    assert entry["actor"] == "sensor:support_triage_quality_regression_sensor" and "2026-03-02" in entry["reason"]

    # the same materialization again: nothing more
    assert isinstance(quality_tick(res, registry, instance, got.cursor), dg.SkipReason)
    assert len(read_alerts(res["home"].path)) == 1 and tracking.alias(name, "champion").version == "1"
    # a late regression report on v2, which is no longer the champion: alert, champion stays
    materialize(instance, "online_quality", "2026-03-03", regression=True, version="v2", judge_certified=True)
    quality_tick(res, registry, instance, got.cursor)
    late = read_alerts(res["home"].path)[-1]
    assert late["details"]["rollback"]["action"] == "skipped" and tracking.alias(name, "champion").version == "1"


def test_regression_only_alerts_when_rollback_is_disabled(res, registry):
    tracking, name = registry
    instance = dg.DagsterInstance.ephemeral()
    materialize(instance, "online_quality", "2026-03-02", regression=True, version="2", judge_certified=True)
    quality_tick(res, registry, instance)
    [alert] = read_alerts(res["home"].path)
    assert alert["details"]["rollback"]["action"] == "disabled"
    assert tracking.alias(name, "champion").version == "2"
    assert "genops.rolled_back_to" not in tracking.get_version(name, "2").tags


def test_an_uncertified_judges_regression_is_not_acted_on(res, registry):
    """Rollback enabled, the champion is the regressing version, but the judge behind the scores
    is not certified (or the materialization does not say): no alert, no rollback, no request."""
    res = automation(res, auto_rollback=True)
    tracking, name = registry
    instance = dg.DagsterInstance.ephemeral()
    materialize(instance, "online_quality", "2026-03-02", regression=True, version="2", judge_certified=False,
                judge_status="UNCERTIFIED judge base: its certificate failed")
    got = quality_tick(res, registry, instance)
    assert not got.run_requests and "ignored (uncertified judge)" in got.skip_reason.skip_message
    materialize(instance, "online_quality", "2026-03-03", regression=True, version="2")  # says nothing: the same
    later = quality_tick(res, registry, instance, got.cursor)
    assert not later.run_requests and "2026-03-03: ignored (uncertified judge)" in later.skip_reason.skip_message
    assert read_alerts(res["home"].path) == [] and tracking.alias(name, "champion").version == "2"


def test_rollback_function_errors(registry):
    tracking, name = registry
    with pytest.raises(RollbackError, match="has no version '7'"):
        tracking.rollback_champion(name, to_version="7")
    tracking.set_alias(name, "champion", "1")
    with pytest.raises(RollbackError, match="v1 records no previous champion"):
        tracking.rollback_champion(name)
    with pytest.raises(RollbackError, match="has no champion"):
        tracking.rollback_champion("genops-other-task")
    manual = tracking.rollback_champion(name, to_version="2")
    assert manual.action == "rolled_back" and tracking.alias(name, "champion").version == "2"


# -- failed runs, alerts, webhook ----------------------------------------------------------------


@dg.op
def load_adapter():
    raise RuntimeError("adapter folder /nowhere is missing")


@dg.job(tags={"genops/trigger": "feedback_labels"})
def failing_job():
    load_adapter()


def failure_tick(res):
    instance = dg.DagsterInstance.ephemeral()
    result = failing_job.execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    ctx = dg.build_run_status_sensor_context(
        sensor_name="run_failure_alert_sensor", dagster_instance=instance, dagster_run=result.dagster_run,
        dagster_event=result.get_run_failure_event(),
        resources={"home": res["home"], "automation": res["automation"]},
    ).for_run_failure()
    run_failure_alert_sensor(ctx)
    return result


def test_failed_run_writes_an_alert(res):
    result = failure_tick(res)
    [alert] = read_alerts(res["home"].path)
    assert alert["kind"] == "run_failure" and alert["severity"] == "error"
    assert alert["details"]["run_id"] == result.run_id and alert["details"]["job"] == "failing_job"
    assert alert["details"]["tags"]["genops/trigger"] == "feedback_labels"
    assert alert["details"]["steps"][0]["step"] == "load_adapter"
    assert "adapter folder /nowhere is missing" in alert["message"]


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list] = []
    status = 204

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.path, self.headers["Content-Type"], json.loads(body)))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture()
def webhook():
    _Hook.received, _Hook.status = [], 204
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks/genops", _Hook
    server.shutdown()
    server.server_close()


def test_webhook_receives_the_alert(res, webhook):
    url, hook = webhook
    res = automation(res, webhook_url=url)
    failure_tick(res)
    [alert] = read_alerts(res["home"].path)
    [(path, content_type, body)] = hook.received
    assert path == "/hooks/genops" and content_type == "application/json"
    assert body == alert


def test_webhook_failure_is_logged_and_the_alert_kept(res, webhook):
    url, hook = webhook
    hook.status = 500
    logged: list[str] = []
    delivery = raise_alert(res["home"].path, "test", "info", "server error", webhook_url=url, log=logged.append)
    assert delivery.webhook_error and "500" in delivery.webhook_error and "500" in logged[0]
    closed = raise_alert(res["home"].path, "test", "info", "nobody listens",
                         webhook_url="http://127.0.0.1:9/none", webhook_timeout_s=2, log=logged.append)
    assert closed.webhook_error and len(logged) == 2
    assert [a["message"] for a in read_alerts(res["home"].path)] == ["server error", "nobody listens"]
    # the sensor goes on when the webhook is down
    failure_tick(automation(res, webhook_url="http://127.0.0.1:9/none"))
    assert read_alerts(res["home"].path)[-1]["kind"] == "run_failure"


def test_concurrent_alerts_are_whole_lines(res):
    threads = [threading.Thread(target=lambda i=i: [raise_alert(res["home"].path, "load", "info",
                                                                f"{i}-{j}" + "x" * 5000)
                                                   for j in range(20)]) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alerts = read_alerts(res["home"].path)
    assert len(alerts) == 80 and len({a["message"] for a in alerts}) == 80


def test_settings_come_from_the_environment_and_reject_unknown_values(monkeypatch, tmp_path):
    from resources import build_resources

    for name in ("FEEDBACK_MIN_LABELS", "DRIFT_ACTION", "AUTO_ROLLBACK", "ALERT_WEBHOOK", "ALERT_WEBHOOK_TIMEOUT",
                 "CT_RUN_CONFIG"):
        monkeypatch.delenv(f"GENOPS_{name}", raising=False)
    assert build_resources(home=tmp_path)["automation"] == AutomationResource(
        label_threshold=10, drift_action="retrain", auto_rollback=False, webhook_url=None, webhook_timeout_s=5.0,
        run_config_file=None)
    env = {"GENOPS_FEEDBACK_MIN_LABELS": "2", "GENOPS_DRIFT_ACTION": "Alert", "GENOPS_AUTO_ROLLBACK": "1",
           "GENOPS_ALERT_WEBHOOK": "http://hooks.example/genops", "GENOPS_ALERT_WEBHOOK_TIMEOUT": "1.5",
           "GENOPS_CT_RUN_CONFIG": str(tmp_path / "ct.yaml")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert build_resources(home=tmp_path)["automation"] == AutomationResource(
        label_threshold=2, drift_action="alert", auto_rollback=True, webhook_url="http://hooks.example/genops",
        webhook_timeout_s=1.5, run_config_file=str(tmp_path / "ct.yaml"))
    for name, bad in [("GENOPS_DRIFT_ACTION", "panic"), ("GENOPS_AUTO_ROLLBACK", "maybe"),
                      ("GENOPS_FEEDBACK_MIN_LABELS", "ten"), ("GENOPS_FEEDBACK_MIN_LABELS", "0"),
                      ("GENOPS_ALERT_WEBHOOK_TIMEOUT", "-1")]:
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=f"{name} must be .*, got '{bad}'"):
            build_resources(home=tmp_path)
        monkeypatch.setenv(name, env[name])


def test_sensors_are_registered_and_running_by_default():
    from genops_assets.definitions import defs

    for task in ("support_triage", "product_qa"):
        for name in ("feedback_labels_sensor", "drift_sensor", "quality_regression_sensor", "incoming_data_sensor"):
            sensor = defs.resolve_sensor_def(f"{task}_{name}")
            assert sensor.default_status == dg.DefaultSensorStatus.RUNNING, sensor.name
        assert defs.resolve_sensor_def(f"{task}_feedback_labels_sensor").job_name == f"{task}_continuous_training"
        assert defs.resolve_sensor_def(f"{task}_drift_sensor").job_name == f"{task}_continuous_training"
    for name in ("run_failure_alert_sensor", "automation_condition_sensor", "request_log_sensor"):
        assert defs.resolve_sensor_def(name).default_status == dg.DefaultSensorStatus.RUNNING, name


# -- run_key deduplication by the Dagster sensor daemon --------------------------------------------

CODE_LOCATION = '''
import dagster as dg
from genops_assets.lib.tasks import TaskRef
from resources.automation import AutomationResource
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking
from sensors.feedback import build_feedback_labels_sensor


@dg.asset(key=["support_triage", "tuned_adapter"])
def retrain():
    pass


defs = dg.Definitions(assets=[retrain],
                      jobs=[dg.define_asset_job("support_triage_continuous_training", selection=[retrain])],
                      sensors=[build_feedback_labels_sensor(TaskRef("support_triage", {tasks!r}))],
                      resources={{"home": GenopsHome(root={home!r}), "automation": AutomationResource(),
                                 "mlflow": MlflowTracking(tracking_uri="sqlite:///{home}/mlflow.db",
                                                          artifact_root="file://{home}/artifacts")}})
'''


def test_daemon_launches_a_run_key_once_even_when_the_cursor_is_lost(res, tmp_path):
    """The sensor daemon itself (not the sensor) refuses a second run with the same run_key."""
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.test_utils import (
        InProcessTestWorkspaceLoadTarget,
        create_test_daemon_workspace_context,
        freeze_time,
        instance_for_test,
    )
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._daemon.sensor import execute_sensor_iteration

    write_labels(res, "batch.jsonl", [label(i) for i in range(10)])
    module = tmp_path / "ct_location.py"
    module.write_text(CODE_LOCATION.format(home=str(res["home"].path), tasks=str(REPO / "tasks")))
    origin = InProcessCodeLocationOrigin(LoadableTargetOrigin(python_file=str(module), attribute="defs",
                                                              working_directory=str(REPO)))
    with instance_for_test() as instance, \
            create_test_daemon_workspace_context(InProcessTestWorkspaceLoadTarget(origin), instance) as ws:
        def tick(at: float) -> None:
            with freeze_time(at):
                list(execute_sensor_iteration(ws, logging.getLogger("genops.test"), None, None))

        start = time.time()
        tick(start)
        [run] = instance.get_runs()
        assert run.tags["genops/trigger"] == "feedback_labels" and run.job_name == "support_triage_continuous_training"

        # forget the cursor, as after `dagster sensor cursor --delete`: the sensor asks again
        [state] = instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
        instance.update_instigator_state(state.with_data(state.instigator_data._replace(cursor=None)))
        tick(start + 60)
        assert len(instance.get_runs()) == 1
        [latest] = instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=1)
        assert latest.status == TickStatus.SKIPPED
        assert run.tags["dagster/run_key"] in latest.run_keys
