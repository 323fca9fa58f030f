"""GenOpsTask: the whole graph of one task folder, as a Dagster component.

A task is a folder of data and settings (``tasks/<name>/``: task.yaml, examples, prompt
templates, output schema). ``GenOpsTask`` turns one folder into that task's assets (keyed
``<task>/<asset>``, grouped ``<task>_<stage>``), checks, jobs, sensors and schedule;
``GenOpsTasks`` makes one ``GenOpsTask`` per folder of the tasks directory, so a new folder is
a new graph at the next reload of the code location. The base model, the request log and the
endpoint's resource usage are shared by every task and live in the defs folder, not here.

A folder that cannot be loaded (bad YAML, a missing file, a schema error, a task name another
folder already declares) becomes one placeholder asset ``<folder>/task_folder`` whose
description and metadata carry the error, with a warning at load; the other tasks load as usual.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from pydantic import Field

from genops_assets.lib.tasks import TaskConfigError, TaskRef, read_task_settings

log = logging.getLogger("genops")

ERROR_ASSET = "task_folder"
ERROR_GROUP = "task_errors"


def _settings():
    from resources.settings import GenopsSettings

    return GenopsSettings.from_env()


def task_graph(task: TaskRef, daily: dg.PartitionsDefinition) -> dg.Definitions:
    """Every definition of one task: assets and checks of each stage, jobs, sensors, schedule."""
    from genops_assets.defs.datasets.assets import build_dataset_assets
    from genops_assets.defs.datasets.checks import build_mart_checks
    from genops_assets.defs.deployment.assets import build_deployment_assets
    from genops_assets.defs.evaluation.assets import build_evaluation_assets
    from genops_assets.defs.evaluation.checks import build_evaluation_checks
    from genops_assets.defs.feedback.ratings import build_rating_assets
    from genops_assets.defs.governance.assets import build_governance_assets
    from genops_assets.defs.governance.checks import build_pii_checks
    from genops_assets.defs.jobs import build_task_jobs
    from genops_assets.defs.judge_tuning.assets import build_judge_tuning_assets
    from genops_assets.defs.monitoring.drift import build_drift_assets
    from genops_assets.defs.monitoring.quality import build_quality_assets
    from genops_assets.defs.monitoring.serving import build_serving_monitoring_assets
    from genops_assets.defs.optimization import build_optimization_assets
    from genops_assets.defs.prompts.assets import build_prompt_assets
    from genops_assets.defs.safety.assets import build_safety_assets
    from genops_assets.defs.safety.checks import build_safety_checks
    from genops_assets.defs.tuning.assets import build_tuning_assets
    from genops_assets.defs.tuning.preference import build_preference_assets, build_preference_checks
    from sensors import build_task_automation

    assets = [*build_dataset_assets(task), *build_prompt_assets(task), *build_tuning_assets(task),
              *build_evaluation_assets(task), *build_safety_assets(task), *build_deployment_assets(task),
              *build_serving_monitoring_assets(task, daily), *build_drift_assets(task, daily),
              *build_quality_assets(task, daily), *build_rating_assets(task), *build_preference_assets(task),
              *build_judge_tuning_assets(task), *build_optimization_assets(task)]
    # A card per tuned version; it reads the safety report where the graph has one.
    assets += build_governance_assets(task, {k for a in assets for k in a.keys})
    checks = [*build_mart_checks(task), *build_pii_checks(task), *build_evaluation_checks(task),
              *build_safety_checks(task), *build_preference_checks(task)]
    jobs = build_task_jobs(task)
    return dg.Definitions.merge(
        dg.Definitions(assets=assets, asset_checks=checks, jobs=jobs),
        build_task_automation(task, [job.name for job in jobs]),
    )


def broken_task(folder: Path, error: str) -> dg.Definitions:
    """The placeholder of a task folder that cannot be loaded: its error, visible in the UI."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", folder.name) or "task"
    log.warning("genops: task folder %s is not loaded: %s", folder, error)
    return dg.Definitions(assets=[dg.AssetSpec(
        key=[name, ERROR_ASSET],
        group_name=ERROR_GROUP,
        description=f"Task folder {folder} cannot be loaded; fix it and reload the code location.\n\n{error}",
        metadata={"error": dg.MetadataValue.text(error), "folder": dg.MetadataValue.path(str(folder))},
        tags={"genops/task_error": ""},
    )])


def monitoring_partitions(home: Path) -> dg.PartitionsDefinition:
    from genops_assets.defs.monitoring.common import daily_partitions
    from resources.paths import install_day

    return daily_partitions(install_day(home))


@dataclass(frozen=True)
class TaskFolder:
    """A folder of the tasks directory and the task name it declares (None: unreadable)."""

    path: Path
    name: str | None
    error: str | None = None


def scan_task_folders(tasks_dir: Path) -> list[TaskFolder]:
    """Every visible folder of ``tasks_dir`` with the name its task.yaml declares (the folder's
    name when it declares none); two folders declaring one name are both errors."""
    if not tasks_dir.is_dir():
        raise FileNotFoundError(f"tasks directory {tasks_dir} does not exist (GENOPS_TASKS_DIR)")
    found: list[TaskFolder] = []
    for path in sorted(p for p in tasks_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        cfg = path / "task.yaml"
        if not cfg.is_file():
            found.append(TaskFolder(path, None, f"{cfg} not found: a task folder needs a task.yaml"))
            continue
        try:
            found.append(TaskFolder(path, read_task_settings(cfg).name or path.name))
        except TaskConfigError as exc:
            found.append(TaskFolder(path, None, str(exc)))
    by_name: dict[str, list[Path]] = {}
    for f in found:
        if f.name is not None:
            by_name.setdefault(f.name, []).append(f.path)
    return [TaskFolder(f.path, None, f"task name '{f.name}' is declared by more than one folder: "
                                     f"{', '.join(str(p) for p in by_name[f.name])}; each task needs a name of its own")
            if f.name is not None and len(by_name[f.name]) > 1 else f for f in found]


def folder_definitions(folder: TaskFolder, tasks_dir: Path, daily: dg.PartitionsDefinition) -> dg.Definitions:
    if folder.error is not None or folder.name is None:
        return broken_task(folder.path, folder.error or "unreadable task folder")
    task = TaskRef(folder.name, str(tasks_dir), folder.path.name)
    try:
        task.load()  # the folder as a whole: data files, schema, templates
    except TaskConfigError as exc:
        return broken_task(folder.path, str(exc))
    return task_graph(task, daily)


class GenOpsTask(dg.Component, dg.Resolvable, dg.Model):
    """The graph of one task folder: ``tasks_dir/folder`` (``GENOPS_TASKS_DIR`` when unset)."""

    folder: str = Field(description="The task's folder under the tasks directory")
    tasks_dir: str | None = Field(None, description="Folder of task folders (default: GENOPS_TASKS_DIR, tasks/)")

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        settings = _settings()
        tasks_dir = Path(self.tasks_dir) if self.tasks_dir else settings.tasks_dir
        matching = [f for f in scan_task_folders(tasks_dir) if f.path.name == self.folder]
        if not matching:
            return broken_task(tasks_dir / self.folder, f"{tasks_dir / self.folder} is not a folder")
        return folder_definitions(matching[0], tasks_dir, monitoring_partitions(settings.home))


class GenOpsTasks(dg.Component, dg.Resolvable, dg.Model):
    """One GenOpsTask per folder of the tasks directory (``GENOPS_TASKS_DIR``, default tasks/):
    adding a folder adds its graph at the next reload of the code location."""

    tasks_dir: str | None = Field(None, description="Folder of task folders (default: GENOPS_TASKS_DIR, tasks/)")

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        settings = _settings()
        tasks_dir = Path(self.tasks_dir) if self.tasks_dir else settings.tasks_dir
        return tasks_definitions(tasks_dir, monitoring_partitions(settings.home))


def tasks_definitions(tasks_dir: Path, daily: dg.PartitionsDefinition,
                      only: Iterable[str] | None = None) -> dg.Definitions:
    """The graphs of every task folder of ``tasks_dir`` (or of the folders named in ``only``)."""
    wanted = set(only) if only is not None else None
    folders = [f for f in scan_task_folders(tasks_dir) if wanted is None or f.path.name in wanted]
    if not folders:
        log.warning("genops: no task folders in %s", tasks_dir)
        return dg.Definitions()
    return dg.Definitions.merge(*(folder_definitions(f, tasks_dir, daily) for f in folders))
