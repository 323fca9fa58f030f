"""Sensors and schedules at genops' boundaries with the outside world.

``defs()`` holds the shared ones (the one endpoint's request log, failed runs, the automation
condition sensor); each task's sensors and schedule are built by its GenOpsTask component
(``build_task_automation``).
"""

import dagster as dg

from genops_assets.lib.tasks import TaskRef
from sensors.feedback import build_feedback_labels_sensor
from sensors.incoming import build_incoming_automation
from sensors.monitoring import automation_condition_sensor, build_monitoring_sensors, run_failure_alert_sensor
from sensors.requests import request_log_sensor


def build_task_automation(task: TaskRef) -> dg.Definitions:
    """One task's sensors (incoming data, reviewer labels, prompt drift, quality regression) and
    its nightly retraining schedule, named after the task."""
    incoming, nightly = build_incoming_automation(task)
    return dg.Definitions(sensors=[incoming, build_feedback_labels_sensor(task), *build_monitoring_sensors(task)],
                          schedules=[nightly])


def defs() -> dg.Definitions:
    return dg.Definitions(sensors=[request_log_sensor, run_failure_alert_sensor, automation_condition_sensor])
