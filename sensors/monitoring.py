"""Monitoring signals that leave Dagster or act on the world: prompt drift -> retrain or alert,
online-quality regression -> alert (and optionally champion rollback) when the judge behind it is
certified (an uncertified judge's regression is logged, never acted on), failed runs -> alert.

The monitoring assets are read through the Dagster instance (their materialization
metadata), never imported. Each sensor keeps the storage id of the last materialization it
handled in its cursor, so a materialization is acted on once.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import dagster as dg

from genops_assets.components.binding import bind_task, task_key
from genops_assets.defs.jobs import continuous_training_job_name
from genops_assets.lib.alerts import raise_alert
from genops_assets.lib.audit import AuditLog, record_rollback
from genops_assets.lib.tasks import TaskRef, task_run_config
from resources.automation import AutomationResource
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking, RollbackError, registered_model_name

PROMPT_DRIFT = "prompt_drift"
ONLINE_QUALITY = "online_quality"
# Materializations read per tick; more wait for the next tick (the cursor moves in order).
BATCH = 100
# Partitions already acted on, remembered so a re-materialized drifting day does not act twice.
ACTED_PARTITIONS_KEPT = 120


# -- reading monitoring materializations ------------------------------------------------------


def _after(cursor: str | None) -> int | None:
    if not cursor:
        return None
    try:
        return int(json.loads(cursor)["after"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"unreadable sensor cursor {cursor[:80]!r}: {exc}") from exc


def new_materializations(instance: dg.DagsterInstance, key: dg.AssetKey, after: int | None) -> list[dg.EventLogRecord]:
    """Materializations of ``key`` after storage id ``after``, oldest first. Without a cursor,
    only the latest one (history before the sensor existed is not acted on)."""
    if after is None:
        return list(instance.fetch_materializations(key, limit=1).records)
    flt = dg.AssetRecordsFilter(asset_key=key, after_storage_id=after)
    return list(instance.fetch_materializations(flt, limit=BATCH, ascending=True).records)


def metadata_values(record: dg.EventLogRecord) -> dict[str, Any]:
    """Plain scalar metadata of a materialization (tables, JSON and plots left out)."""
    mat = record.asset_materialization
    out: dict[str, Any] = {}
    for k, v in (mat.metadata if mat else {}).items():
        value = getattr(v, "value", v)
        if value is None or isinstance(value, (bool, int, float, str)):
            out[k] = value
    return out


def _flag(meta: dict[str, Any], key: str, record: dg.EventLogRecord) -> bool:
    value = meta.get(key)
    if not isinstance(value, bool):
        raise ValueError(f"{record.asset_key.to_user_string() if record.asset_key else '?'} materialization "
                         f"{record.storage_id} (run {record.run_id}) has no boolean metadata '{key}' (got {value!r})")
    return value


# -- sensors --------------------------------------------------------------------------------


def drift_sensor(context: dg.SensorEvaluationContext, home: GenopsHome, task: TaskRef,
                 automation: AutomationResource):
    state = json.loads(context.cursor) if context.cursor else {}
    acted: list[str] = list(state.get("acted") or [])
    records = new_materializations(context.instance, task_key(task, PROMPT_DRIFT), _after(context.cursor))
    if not records:
        return dg.SkipReason("no new prompt_drift materialization")
    after = max(r.storage_id for r in records)

    drifting: dict[str, tuple[dg.EventLogRecord, dict[str, Any]]] = {}
    for rec in records:  # oldest first: the newest materialization of a partition wins
        meta = metadata_values(rec)
        partition = rec.partition_key or "-"
        if _flag(meta, "drift", rec):
            drifting[partition] = (rec, meta)
        else:
            drifting.pop(partition, None)
    fresh = {p: v for p, v in drifting.items() if p not in acted}
    for p in sorted(set(drifting) - set(fresh)):
        context.log.info(f"prompt drift on {p} was already acted on")
    if not fresh:
        return dg.SensorResult(skip_reason=f"no new drifting partition in {len(records)} materialization(s)",
                               cursor=json.dumps({"after": after, "acted": acted}))

    partitions = sorted(fresh)
    newest_partition = partitions[-1]
    rec, meta = fresh[newest_partition]
    acted = (acted + partitions)[-ACTED_PARTITIONS_KEPT:]
    cursor = json.dumps({"after": after, "acted": acted})
    details = {"partitions": partitions, "flagged_share": {p: fresh[p][1].get("flagged_share") for p in partitions},
               "storage_id": rec.storage_id, "run_id": rec.run_id, "action": automation.drift_action,
               "task": task.name}
    share = meta.get("flagged_share")
    share_text = f"{share:.1%}" if isinstance(share, (int, float)) else "unknown share"
    if automation.drift_action == "alert":
        raise_alert(home.path, "prompt_drift", "warning",
                    f"prompt drift on {', '.join(partitions)} ({share_text} of prompts flagged on {newest_partition})",
                    details, webhook_url=automation.webhook_url, webhook_timeout_s=automation.webhook_timeout_s,
                    log=context.log.warning)
        return dg.SensorResult(skip_reason=f"drift on {partitions}: alert written (GENOPS_DRIFT_ACTION=alert)",
                               cursor=cursor)
    context.log.info(f"prompt drift on {partitions} ({share_text} flagged) -> continuous training")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(
            run_key=f"prompt_drift:{newest_partition}:{rec.storage_id}",
            run_config=task_run_config(task.name, automation.run_config()),
            tags={"genops/trigger": "prompt_drift", "genops/task": task.name,
                  "genops/drift_partition": newest_partition, "genops/drift_partitions": ",".join(partitions),
                  "genops/flagged_share": str(share)},
        )],
        cursor=cursor,
    )


def quality_sensor_name(task: TaskRef) -> str:
    return f"{task.name}_quality_regression_sensor"


def quality_regression_sensor(context: dg.SensorEvaluationContext, home: GenopsHome, task: TaskRef,
                              mlflow: MlflowTracking, automation: AutomationResource):
    records = new_materializations(context.instance, task_key(task, ONLINE_QUALITY), _after(context.cursor))
    if not records:
        return dg.SkipReason("no new online_quality materialization")
    model_name = registered_model_name(task.name)
    handled = []
    for rec in records:
        meta = metadata_values(rec)
        if not _flag(meta, "regression", rec):
            continue
        if meta.get("judge_certified") is not True:
            # An uncertified judge's scores decide nothing: no alert, no rollback.
            context.log.info(f"online_quality {rec.partition_key or '-'} (materialization {rec.storage_id}) reports a "
                             f"regression from an uncertified judge: not acted on ({meta.get('judge_status')})")
            handled.append(f"{rec.partition_key or '-'}: ignored (uncertified judge)")
            continue
        version = str(meta.get("version") or "").removeprefix("v")
        partition = rec.partition_key or "-"
        if not automation.auto_rollback:
            rollback: dict[str, Any] = {"action": "disabled", "reason": "GENOPS_AUTO_ROLLBACK is not 1"}
        elif not version:
            rollback = {"action": "skipped", "reason": "the materialization names no version"}
        else:
            try:
                result = mlflow.rollback_champion(
                    model_name, only_if_champion=version,
                    reason=f"online_quality regression on {partition} (materialization {rec.storage_id})")
                record_rollback(AuditLog(home.audit_path), result, actor=f"sensor:{quality_sensor_name(task)}",
                                run_id=rec.run_id)
                rollback = asdict(result)
            except RollbackError as exc:
                rollback = {"action": "failed", "reason": str(exc)}
        rolled = rollback["action"] == "rolled_back"
        outcome = (f"champion moved back to v{rollback['to_version']}" if rolled
                   else f"champion not moved ({rollback['action']}: {rollback['reason']})")
        message = f"online quality regressed for {model_name} v{version or '?'} on {partition}; {outcome}"
        context.log.warning(message)
        raise_alert(home.path, "online_quality_regression", "critical" if rollback["action"] == "failed" else "error",
                    message, {"model": model_name, "version": version, "partition": partition,
                              "storage_id": rec.storage_id, "run_id": rec.run_id, "metadata": meta,
                              "rollback": rollback},
                    webhook_url=automation.webhook_url, webhook_timeout_s=automation.webhook_timeout_s,
                    log=context.log.warning)
        handled.append(f"{partition}: {rollback['action']}")
    cursor = json.dumps({"after": max(r.storage_id for r in records)})
    reason = (f"regressions handled: {'; '.join(handled)}" if handled
              else f"no regression in {len(records)} materialization(s)")
    return dg.SensorResult(skip_reason=reason, cursor=cursor)


def build_monitoring_sensors(task: TaskRef) -> list[dg.SensorDefinition]:
    """The task's drift and quality-regression sensors (each reads that task's monitoring assets)."""
    every_minute = {"minimum_interval_seconds": 60, "default_status": dg.DefaultSensorStatus.RUNNING}
    drift_description = (
        f"Acts on prompt drift of {task.name} (a {task.name}/prompt_drift materialization with drift=True) once "
        "per partition: a continuous-training run (GENOPS_DRIFT_ACTION=retrain, default) or an alert (=alert).")
    quality_description = (
        f"Alerts when a {task.name}/online_quality materialization reports regression=True from a certified "
        "judge (judge_certified=True; an uncertified judge's scores are not acted on); with "
        "GENOPS_AUTO_ROLLBACK=1 it also moves `champion` back to the previous champion, but only if the "
        "regressing version is still the champion. Once per materialization.")
    return [
        dg.sensor(name=f"{task.name}_drift_sensor", job_name=continuous_training_job_name(task.name),
                  description=drift_description, **every_minute)(bind_task(drift_sensor, task)),
        dg.sensor(name=quality_sensor_name(task), description=quality_description,
                  **every_minute)(bind_task(quality_regression_sensor, task)),
    ]


@dg.run_failure_sensor(
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Writes an alert (alerts.jsonl and the optional webhook) for every failed run.",
)
def run_failure_alert_sensor(context: dg.RunFailureSensorContext, home: GenopsHome, automation: AutomationResource):
    run = context.dagster_run
    steps = []
    for ev in context.get_step_failure_events():
        error = getattr(ev.event_specific_data, "error", None)
        while error is not None and error.cause is not None:  # Dagster wraps the user's exception
            error = error.cause
        steps.append({"step": ev.step_key, "error": (error.message.strip() if error else ev.message or "")[:2000]})
    tags = {k: v for k, v in run.tags.items() if k.startswith(("genops/", "dagster/sensor_name",
                                                               "dagster/schedule_name", "dagster/run_key"))}
    first = f": {steps[0]['step']}: {steps[0]['error'].splitlines()[0] if steps[0]['error'] else ''}" if steps else ""
    raise_alert(home.path, "run_failure", "error", f"run {run.run_id[:8]} of job {run.job_name} failed{first}",
                {"run_id": run.run_id, "job": run.job_name, "tags": tags, "steps": steps,
                 "failure": context.failure_event.message},
                webhook_url=automation.webhook_url, webhook_timeout_s=automation.webhook_timeout_s,
                log=context.log.warning)


# Monitoring assets propagate with eager_with_follow_up() (eager(), plus one more run for request
# logs loaded during a run); this sensor evaluates those conditions. Declared explicitly with
# default_status RUNNING ("declared in code"), so it runs without a switch in the UI and replaces
# Dagster's implicit default_automation_condition_sensor.
# It targets every asset: assets without a condition are never requested by it.
automation_condition_sensor = dg.AutomationConditionSensorDefinition(
    "automation_condition_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Evaluates the automation conditions of genops' assets (monitoring assets update eagerly "
    "when their upstream request logs do).",
)
