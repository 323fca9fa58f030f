"""What genops does on its own: the sensors' thresholds and actions, alerts, and the run config of
the retrains they start."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from resources.settings import GenopsSettings

# The settings' defaults, without reading the environment: each default is stated once, there.
_DEFAULTS = GenopsSettings.model_construct()


class AutomationResource(dg.ConfigurableResource):
    label_threshold: int = Field(_DEFAULTS.feedback_min_labels, ge=1, description=(
        "New valid labelled rows that trigger a continuous-training run (GENOPS_FEEDBACK_MIN_LABELS)"))
    drift_action: Literal["retrain", "alert"] = Field(_DEFAULTS.drift_action, description=(
        "What prompt drift does: a continuous-training run, or an alert only (GENOPS_DRIFT_ACTION)"))
    auto_rollback: bool = Field(_DEFAULTS.auto_rollback, description=(
        "Move `champion` back when online quality regresses (GENOPS_AUTO_ROLLBACK)"))
    webhook_url: str | None = Field(_DEFAULTS.alert_webhook, description=(
        "URL that receives each alert as a JSON POST (GENOPS_ALERT_WEBHOOK)"))
    webhook_timeout_s: float = Field(_DEFAULTS.alert_webhook_timeout, gt=0, description=(
        "Seconds before a webhook POST gives up (GENOPS_ALERT_WEBHOOK_TIMEOUT)"))
    run_config_file: str | None = Field(_DEFAULTS.ct_run_config, description=(
        "YAML file of Dagster run config for every retrain a sensor starts; read at each tick, so an "
        "edit needs no reload (GENOPS_CT_RUN_CONFIG)"))

    @classmethod
    def from_settings(cls, settings: GenopsSettings) -> AutomationResource:
        return cls(label_threshold=settings.feedback_min_labels, drift_action=settings.drift_action,
                   auto_rollback=settings.auto_rollback, webhook_url=settings.alert_webhook,
                   webhook_timeout_s=settings.alert_webhook_timeout, run_config_file=settings.ct_run_config)

    def run_config(self) -> dict[str, Any]:
        """The run config of a sensor-started retrain: the file's content, or {} (the job's defaults)."""
        if not self.run_config_file:
            return {}
        import yaml

        where = f"GENOPS_CT_RUN_CONFIG={self.run_config_file}"
        try:
            data = yaml.safe_load(Path(self.run_config_file).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"{where}: cannot read the run config: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{where}: the run config must be a mapping, got {type(data).__name__}")
        return data

