"""What the monitoring assets share: one partition per UTC day of request logs, the warehouse
schema and MLflow experiment they write to, and their CPU priority."""

from datetime import UTC, datetime

import dagster as dg

# The endpoint process's own table (resource_usage); a task's tables are in monitoring_<task>.
MONITORING_SCHEMA = "monitoring"


def daily_partitions(start_date: str) -> dg.DailyPartitionsDefinition:
    """One partition per UTC day from ``start_date`` (the data directory's install day, so a
    fresh install shows today, not months of empty days) to today."""
    return dg.DailyPartitionsDefinition(start_date=start_date, timezone="UTC", end_offset=1)


def monitoring_experiment(task_name: str) -> str:
    return f"genops/{task_name}/monitoring"


def utc_day(context: dg.AssetExecutionContext) -> tuple[datetime, datetime]:
    """The partition's UTC day (timezone-aware)."""
    window = context.partition_time_window
    return window.start.astimezone(UTC), window.end.astimezone(UTC)


def naive_utc(moment: datetime) -> datetime:
    """The way feedback.requests stores ``ts``: UTC without a timezone."""
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def run_in_background(context: dg.AssetExecutionContext, nice: int) -> None:
    """Give the CPU to the endpoint first: a monitoring run that has a process of its own
    (Dagster starts every launched run in one) moves into an autogroup of its own at ``nice``
    (``GenopsHome.background_nice``; see ``genops_assets.lib.priority``). An in-process
    materialization (a test, a notebook) keeps its caller's priority."""
    import multiprocessing

    from genops_assets.lib.priority import lower_priority

    if multiprocessing.parent_process() is None:
        context.log.debug("in-process run: CPU priority unchanged")
        return
    done = lower_priority(nice, new_session=True)
    context.log.info(f"background CPU priority: {', '.join(done) or 'unchanged'}")
