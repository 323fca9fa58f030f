"""genops' Dagster components: a task folder is a GenOpsTask; GenOpsTasks makes one per folder."""

from genops_assets.components.task import GenOpsTask, GenOpsTasks

__all__ = ["GenOpsTask", "GenOpsTasks"]
