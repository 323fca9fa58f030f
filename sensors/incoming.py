"""Continuous training from the outside world: new data files in ``tasks/<name>/incoming/``."""


from pathlib import Path

import dagster as dg

from genops_assets.components.binding import bind_task
from genops_assets.defs.jobs import continuous_training_job_name
from genops_assets.lib.hashing import sha256_file, sha256_json
from genops_assets.lib.tasks import RAW_SUFFIXES, TaskRef, task_run_config
from resources.automation import AutomationResource


def incoming_digest(incoming: Path) -> tuple[str, list[str]]:
    """Digest of the incoming folder's data files (names and contents); empty string if none."""
    if not incoming.is_dir():
        return "", []
    files = sorted(p for p in incoming.iterdir() if p.is_file() and p.suffix in RAW_SUFFIXES)
    if not files:
        return "", []
    listing = [(p.name, sha256_file(p)) for p in files]
    return sha256_json(listing), [p.name for p in files]


def incoming_data_sensor(context: dg.SensorEvaluationContext, task: TaskRef, automation: AutomationResource):
    spec = task.load()
    digest, names = incoming_digest(spec.incoming_dir)
    if not digest:
        return dg.SkipReason(f"no data files in {spec.incoming_dir}")
    if digest == context.cursor:
        return dg.SkipReason(f"incoming data unchanged ({digest[:12]})")
    context.log.info(f"incoming data changed: {names} -> digest {digest[:12]}")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"{spec.name}:{digest}",
                run_config=task_run_config(spec.name, automation.run_config()),
                tags={"genops/trigger": "incoming_data", "genops/task": spec.name, "genops/incoming_digest": digest},
            )
        ],
        cursor=digest,
    )


def build_incoming_automation(task: TaskRef) -> tuple[dg.SensorDefinition, dg.ScheduleDefinition]:
    """The task's incoming-data sensor and its nightly retraining schedule."""
    job = continuous_training_job_name(task.name)
    sensor = dg.sensor(
        name=f"{task.name}_incoming_data_sensor",
        job_name=job,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Requests a continuous-training run of {task.name} when files in {task.root / 'incoming'} "
        "are added or changed. run_key = content digest, so the same data never trains twice.",
    )(bind_task(incoming_data_sensor, task))
    nightly = dg.ScheduleDefinition(
        name=f"{task.name}_nightly_training",
        job_name=job,
        cron_schedule="0 2 * * *",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Retrain nightly; an unchanged dataset reuses the registered adapter (no second training).",
    )
    return sensor, nightly
