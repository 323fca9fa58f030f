"""Run config of the continuous-training runs that sensors request.

``GENOPS_CT_RUN_CONFIG`` names a YAML file of Dagster run config (for example a smaller
evaluation, or more tuning steps) that every retrain started by a sensor uses; unset, the
job's defaults apply. Read at each tick, so a change needs no restart of the daemon.
"""

import os
from pathlib import Path
from typing import Any

RUN_CONFIG_ENV = "GENOPS_CT_RUN_CONFIG"


def ct_run_config() -> dict[str, Any]:
    path = os.environ.get(RUN_CONFIG_ENV)
    if not path:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{RUN_CONFIG_ENV}={path}: cannot read the run config: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{RUN_CONFIG_ENV}={path}: the run config must be a mapping, got {type(data).__name__}")
    return data
