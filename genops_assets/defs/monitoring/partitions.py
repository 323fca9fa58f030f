"""Time partitions of the monitoring assets: one partition per UTC day of request logs."""

import dagster as dg

MONITORING_START = "2026-01-01"

daily = dg.DailyPartitionsDefinition(start_date=MONITORING_START, timezone="UTC", end_offset=1)
