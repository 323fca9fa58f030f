"""Continuous training from the outside world: new data files in ``tasks/<name>/incoming/``, and
the nightly retrain. Both run only the assets that new data or new code changed (sensors/incremental.py)."""


from pathlib import Path

import dagster as dg

from genops_assets.components.binding import bind_task
from genops_assets.defs.jobs import continuous_training_job_name
from genops_assets.lib.hashing import sha256_file, sha256_json
from genops_assets.lib.tasks import RAW_SUFFIXES, TaskRef
from resources.automation import AutomationResource
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking
from sensors.incremental import continuous_training_request


def incoming_digest(incoming: Path) -> tuple[str, list[str]]:
    """Digest of the incoming folder's data files (names and contents); empty string if none."""
    if not incoming.is_dir():
        return "", []
    files = sorted(p for p in incoming.iterdir() if p.is_file() and p.suffix in RAW_SUFFIXES)
    if not files:
        return "", []
    listing = [(p.name, sha256_file(p)) for p in files]
    return sha256_json(listing), [p.name for p in files]


def incoming_data_sensor(context: dg.SensorEvaluationContext, task: TaskRef, home: GenopsHome,
                         automation: AutomationResource, mlflow: MlflowTracking):
    spec = task.load()
    digest, names = incoming_digest(spec.incoming_dir)
    if not digest:
        return dg.SkipReason(f"no data files in {spec.incoming_dir}")
    if digest == context.cursor:
        return dg.SkipReason(f"incoming data unchanged ({digest[:12]})")
    context.log.info(f"incoming data changed: {names} -> digest {digest[:12]}")
    request, _ = continuous_training_request(
        context, spec, home, mlflow, automation.run_config(), continuous_training_job_name(spec.name),
        run_key=f"{spec.name}:{digest}",
        tags={"genops/trigger": "incoming_data", "genops/task": spec.name, "genops/incoming_digest": digest})
    if request is None:
        return dg.SensorResult(skip_reason=f"incoming data {digest[:12]} changes no asset of the loop", cursor=digest)
    return dg.SensorResult(run_requests=[request], cursor=digest)


def nightly_training(context: dg.ScheduleEvaluationContext, task: TaskRef, home: GenopsHome,
                     automation: AutomationResource, mlflow: MlflowTracking):
    spec = task.load()
    request, _ = continuous_training_request(
        context, spec, home, mlflow, automation.run_config(), continuous_training_job_name(spec.name),
        run_key=None, tags={"genops/trigger": "nightly", "genops/task": spec.name})
    if request is None:
        return dg.SkipReason(f"nothing changed since the last materializations of {spec.name}'s loop")
    return request


def build_incoming_automation(task: TaskRef) -> tuple[dg.SensorDefinition, dg.ScheduleDefinition]:
    """The task's incoming-data sensor and its nightly retraining schedule."""
    job = continuous_training_job_name(task.name)
    sensor = dg.sensor(
        name=f"{task.name}_incoming_data_sensor",
        job_name=job,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Requests a continuous-training run of {task.name} when files in {task.root / 'incoming'} "
        "are added or changed. run_key = content digest, so the same data never trains twice; the run "
        "materializes only the assets the new data changes.",
    )(bind_task(incoming_data_sensor, task))
    nightly = dg.schedule(
        name=f"{task.name}_nightly_training",
        job_name=job,
        cron_schedule="0 2 * * *",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Retrain nightly what new data or new code changed since the last run; when nothing "
                    "changed, no run (and an unchanged dataset would reuse the registered adapter anyway).",
    )(bind_task(nightly_training, task))
    return sensor, nightly
