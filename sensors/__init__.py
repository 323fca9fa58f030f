"""Sensors and schedules at genops' boundaries with the outside world."""

import dagster as dg

from sensors.incoming import incoming_data_sensor, nightly_training


def defs() -> dg.Definitions:
    return dg.Definitions(sensors=[incoming_data_sensor], schedules=[nightly_training])
