"""Sensors and schedules at genops' boundaries with the outside world."""

import dagster as dg

from sensors.feedback import feedback_labels_sensor
from sensors.incoming import incoming_data_sensor, nightly_training
from sensors.monitoring import (
    automation_condition_sensor,
    drift_sensor,
    quality_regression_sensor,
    run_failure_alert_sensor,
)
from sensors.requests import request_log_sensor


def defs() -> dg.Definitions:
    return dg.Definitions(
        sensors=[incoming_data_sensor, request_log_sensor, feedback_labels_sensor, drift_sensor,
                 quality_regression_sensor, run_failure_alert_sensor, automation_condition_sensor],
        schedules=[nightly_training],
    )
