"""The genops Dagster code location. Thin: the defs folder (shared assets, and one GenOpsTask
component per task folder), the shared sensors, and the resources.

Loading it imports no ML library (torch, transformers, peft, trl, deepspeed, great_expectations);
those are imported inside the assets that use them.
"""

from pathlib import Path

import dagster as dg

import resources
import sensors


def graph_definitions() -> dg.Definitions:
    """Assets, checks, jobs and automation of every task and the shared pieces, without
    resources (tests bind their own). Reads GENOPS_TASKS_DIR and GENOPS_HOME."""
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        sensors.defs(),
        # One machine, one DuckDB file, one model in memory at a time: steps run in one process.
        dg.Definitions(executor=dg.in_process_executor),
    )


defs = dg.Definitions.merge(graph_definitions(), resources.defs())
