"""Continuous training from the outside world: new data files in ``tasks/<name>/incoming/``."""


from pathlib import Path

import dagster as dg

from genops_assets.lib.hashing import sha256_file, sha256_json
from genops_assets.lib.tasks import RAW_SUFFIXES
from resources.automation import AutomationResource
from resources.task import TaskResource


def incoming_digest(incoming: Path) -> tuple[str, list[str]]:
    """Digest of the incoming folder's data files (names and contents); empty string if none."""
    if not incoming.is_dir():
        return "", []
    files = sorted(p for p in incoming.iterdir() if p.is_file() and p.suffix in RAW_SUFFIXES)
    if not files:
        return "", []
    listing = [(p.name, sha256_file(p)) for p in files]
    return sha256_json(listing), [p.name for p in files]


@dg.sensor(
    job_name="continuous_training",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Requests a continuous-training run when files in the task's incoming/ folder are "
    "added or changed. run_key = content digest, so the same data never trains twice.",
)
def incoming_data_sensor(context: dg.SensorEvaluationContext, task: TaskResource, automation: AutomationResource):
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
                run_config=automation.run_config(),
                tags={"genops/trigger": "incoming_data", "genops/task": spec.name, "genops/incoming_digest": digest},
            )
        ],
        cursor=digest,
    )


nightly_training = dg.ScheduleDefinition(
    name="nightly_training",
    job_name="continuous_training",
    cron_schedule="0 2 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Retrain nightly; an unchanged dataset reuses the registered adapter (no second training).",
)
