"""The endpoint process's resource usage: one process serves every task, so one shared asset,
partitioned by day from the data directory's install day."""

import dagster as dg

from genops_assets.defs.monitoring.serving import build_resource_usage


@dg.definitions
def defs() -> dg.Definitions:
    from genops_assets.components.task import monitoring_partitions
    from resources import genops_home

    return dg.Definitions(assets=[build_resource_usage(monitoring_partitions(genops_home()))])
