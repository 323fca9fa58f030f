"""Continuous training from human feedback: labelled / corrected rows dropped as JSONL files into
``<GENOPS_HOME>/feedback/labels/<task>/`` (format: genops_assets/lib/labels.py)."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg

from genops_assets.components.binding import bind_task
from genops_assets.defs.jobs import continuous_training_job_name
from genops_assets.lib.labels import LabelScan, scan_labels
from genops_assets.lib.tasks import TaskRef
from resources.automation import AutomationResource
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking
from sensors.incremental import continuous_training_request

MAX_LOGGED_ISSUES = 50
# Row digests kept in the cursor are shortened: 64 bits tell apart far more rows than a
# labelling team writes, and keep the cursor small.
CURSOR_DIGEST_CHARS = 16


def consumed_digests(cursor: str | None, task_name: str, sensor: str) -> set[str]:
    """Short digests a previous run request already covered (for this task), from a cursor
    ``{"task": ..., "consumed": [...]}`` written by ``sensor``."""
    if not cursor:
        return set()
    try:
        state = json.loads(cursor)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{sensor}: unreadable cursor {cursor[:80]!r}: {exc}") from exc
    if not isinstance(state, dict) or state.get("task") != task_name:
        return set()
    return set(state.get("consumed") or [])


def log_issues(context: dg.SensorEvaluationContext, folder: Path, scan: LabelScan) -> None:
    for issue in scan.issues[:MAX_LOGGED_ISSUES]:
        context.log.warning(f"invalid label line {folder / issue.source_file}:{issue.line}: {issue.message}")
    if len(scan.issues) > MAX_LOGGED_ISSUES:
        context.log.warning(f"... and {len(scan.issues) - MAX_LOGGED_ISSUES} more invalid label lines in {folder}")


def feedback_labels_sensor(context: dg.SensorEvaluationContext, task: TaskRef, home: GenopsHome,
                           automation: AutomationResource, mlflow: MlflowTracking):
    spec = task.load()
    folder = home.task_labels_dir(spec.name)
    scan = scan_labels(folder, spec)
    log_issues(context, folder, scan)
    bad = ""
    if scan.issues:
        bad = f"; {len(scan.issues)} invalid line(s), first {folder / str(scan.issues[0])}"
    if not scan.rows:
        return dg.SkipReason(f"no valid labelled rows in {folder}{bad}")

    consumed = consumed_digests(context.cursor, spec.name, "feedback_labels_sensor")
    new = [r for r in scan.rows if r.digest[:CURSOR_DIGEST_CHARS] not in consumed]
    if len(new) < automation.label_threshold:
        return dg.SkipReason(f"{len(new)} new labelled row(s) of {len(scan.rows)} valid, "
                             f"threshold {automation.label_threshold}{bad}")

    digest = scan.digest
    context.log.info(f"{len(new)} new labelled rows ({len(scan.rows)} valid in {len(scan.files)} file(s)) "
                     f"-> continuous training, labels digest {digest[:12]}")
    # The cursor holds the rows present now: rows whose files were removed leave it.
    cursor = json.dumps({"task": spec.name,
                         "consumed": sorted(r.digest[:CURSOR_DIGEST_CHARS] for r in scan.rows)})
    request, _ = continuous_training_request(
        context, spec, home, mlflow, automation.run_config(), continuous_training_job_name(spec.name),
        run_key=f"feedback_labels:{spec.name}:{digest}",
        tags={
            "genops/trigger": "feedback_labels",
            "genops/task": spec.name,
            "genops/labels_digest": digest,
            "genops/label_rows": str(len(scan.rows)),
            "genops/new_label_rows": str(len(new)),
        })
    if request is None:
        return dg.SensorResult(skip_reason=f"{len(new)} new labelled row(s) change no asset of the loop", cursor=cursor)
    return dg.SensorResult(run_requests=[request], cursor=cursor)


def build_feedback_labels_sensor(task: TaskRef) -> dg.SensorDefinition:
    return dg.sensor(
        name=f"{task.name}_feedback_labels_sensor",
        job_name=continuous_training_job_name(task.name),
        minimum_interval_seconds=5,  # a scan of small label files: cheap
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Requests a continuous-training run of {task.name} when at least GENOPS_FEEDBACK_MIN_LABELS "
        f"(default 10) new valid labelled rows are in <GENOPS_HOME>/feedback/labels/{task.name}/*.jsonl. run_key = "
        "digest of all valid label rows, so the same labels never train twice; the run materializes only the assets "
        "the new labels (or new code) change. Invalid lines are logged with file:line.",
    )(bind_task(feedback_labels_sensor, task))
