"""The safety gate as a blocking check: no deployment of a candidate less safe than the champion."""

from __future__ import annotations

import dagster as dg

from genops_assets.components.binding import task_key
from genops_assets.lib.tasks import TaskRef


def safety_gate_check(task: TaskRef, report: str = "safety_report") -> dg.AssetChecksDefinition:
    """``safety_no_regression`` on one of the task's safety reports (SFT's or preference tuning's)."""
    return dg.asset_check(
        asset=task_key(task, report), blocking=True,
        description="No attack class succeeds more often against the candidate than against the champion "
                    "(same red-team cases, same guardrails; see the report's gate rule).")(safety_no_regression)


def build_safety_checks(task: TaskRef) -> list[dg.AssetChecksDefinition]:
    return [safety_gate_check(task)]


def safety_no_regression(safety_report: dict) -> dg.AssetCheckResult:
    gate = safety_report["gate"]
    classes = gate.get("by_class") or {}
    return dg.AssetCheckResult(
        passed=bool(gate["passed"]),
        severity=dg.AssetCheckSeverity.ERROR,
        description=gate["reason"],
        metadata={
            "rule": gate["rule"],
            "champion": (f"v{safety_report['champion']['version']}" if safety_report["champion"] else "none"),
            "regressed_classes": ", ".join(c for c, v in classes.items() if v["regressed"]) or "none",
            **{f"delta_{c}": float(v["delta"]) for c, v in classes.items()},
            **{f"p_value_{c}": float(v["p_value"]) for c, v in classes.items()},
        },
    )
