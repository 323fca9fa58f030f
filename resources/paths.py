"""The genops data directory: every piece of state lives under one root."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
from pydantic import Field

from genops_assets.lib.ratings import store_path
from resources.settings import DEFAULT_BACKGROUND_NICE

# The UTC day the data directory was set up (YYYY-MM-DD): daily monitoring partitions start there.
INSTALL_MARKER = "installed_on"


def install_day(root: Path) -> str:
    """The day recorded in ``<root>/installed_on``, written now (today, UTC) when missing. The
    first writer wins (exclusive create), so every process reads the same day afterwards."""
    marker = root / INSTALL_MARKER
    if not marker.is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{INSTALL_MARKER}.{os.getpid()}"
        tmp.write_text(datetime.now(UTC).strftime("%Y-%m-%d") + "\n", encoding="utf-8")
        try:
            os.link(tmp, marker)  # atomic, and fails when another process got there first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    text = marker.read_text(encoding="utf-8").strip()
    try:
        datetime.strptime(text, "%Y-%m-%d")
    except ValueError as exc:
        raise ValueError(f"{marker}: expected the install day as YYYY-MM-DD, got {text[:40]!r}") from exc
    return text


class GenopsHome(dg.ConfigurableResource):
    """Root of all local state: Dagster home, MLflow store, DuckDB, model cache, endpoint."""

    root: str
    background_nice: int = Field(DEFAULT_BACKGROUND_NICE, ge=0, le=19, description=(
        "CPU nice value of background work on this machine (monitoring runs) beside the endpoint; "
        "0 leaves the priority alone (GENOPS_BACKGROUND_NICE)"))

    @property
    def path(self) -> Path:
        return Path(self.root)

    def sub(self, *parts: str) -> Path:
        p = self.path.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def duckdb_path(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path / "warehouse.duckdb"

    @property
    def models_dir(self) -> Path:
        return self.sub("models")

    @property
    def runs_dir(self) -> Path:
        return self.sub("runs")

    @property
    def cache_dir(self) -> Path:
        return self.sub("cache")

    @property
    def registry_cache(self) -> Path:
        """Local copies of registered adapters, one folder per model and version."""
        return self.cache_dir / "registry"

    @property
    def endpoint_dir(self) -> Path:
        return self.sub("endpoint")

    @property
    def labels_dir(self) -> Path:
        """The folder of reviewers' labelled live answers, one subfolder per task."""
        return self.path / "feedback" / "labels"

    @property
    def audit_path(self) -> Path:
        """The append-only audit log of deploys, promotions and rollbacks (SQLite)."""
        return self.sub("audit") / "audit.sqlite"

    @property
    def ratings_path(self) -> Path:
        """The rating UI's store of raters, queue items and ratings (SQLite)."""
        return store_path(self.path)

    def task_labels_dir(self, task: str) -> Path:
        """Where reviewers drop labelled live answers of ``task`` (read by the task's feedback
        sensor and raw examples; not created here, a missing folder means no labels)."""
        return self.labels_dir / task
