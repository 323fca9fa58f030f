"""Sensors and schedules at genops' boundaries with the outside world.

``defs()`` holds the shared ones (the one endpoint's request log, failed runs, the automation
condition sensor); each task's sensors and schedule are built by its GenOpsTask component
(``build_task_automation``).
"""

from collections.abc import Iterable

import dagster as dg

from genops_assets.defs.jobs import preference_tuning_job_name
from genops_assets.lib.tasks import TaskRef
from sensors.feedback import build_feedback_labels_sensor
from sensors.incoming import build_incoming_automation
from sensors.monitoring import automation_condition_sensor, build_monitoring_sensors, run_failure_alert_sensor
from sensors.preference import build_preference_pairs_sensor
from sensors.requests import request_log_sensor


def build_task_automation(task: TaskRef, job_names: Iterable[str] = ()) -> dg.Definitions:
    """One task's sensors (incoming data, reviewer labels, prompt drift, quality regression,
    agreed preference pairs) and its nightly retraining schedule, named after the task.
    ``job_names``: the task's jobs; the preference-pairs sensor is built when the
    preference-tuning job it requests is among them (a sensor may not name a missing job)."""
    incoming, nightly = build_incoming_automation(task)
    sensors = [incoming, build_feedback_labels_sensor(task), *build_monitoring_sensors(task)]
    if preference_tuning_job_name(task.name) in set(job_names):
        sensors.append(build_preference_pairs_sensor(task))
    return dg.Definitions(sensors=sensors, schedules=[nightly])


def defs() -> dg.Definitions:
    return dg.Definitions(sensors=[request_log_sensor, run_failure_alert_sensor, automation_condition_sensor])
