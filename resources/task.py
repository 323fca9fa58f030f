"""The active task: a folder under tasks/, chosen by configuration."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from genops_assets.lib.tasks import TaskSpec, load_task


class TaskResource(dg.ConfigurableResource):
    """Which task folder the graph works on (``tasks_dir/name``)."""

    tasks_dir: str
    name: str = "support_triage"

    def load(self) -> TaskSpec:
        return load_task(Path(self.tasks_dir), self.name)
