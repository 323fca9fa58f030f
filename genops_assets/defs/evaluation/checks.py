"""The promotion gate as a blocking check: no deployment unless the candidate wins."""

from __future__ import annotations

import dagster as dg

from genops_assets.components.binding import task_key
from genops_assets.lib.tasks import TaskRef


def promotion_gate_check(task: TaskRef, report: str = "eval_report") -> dg.AssetChecksDefinition:
    """``beats_champion`` on one of the task's evaluation reports (SFT's or preference tuning's)."""
    return dg.asset_check(
        asset=task_key(task, report), blocking=True,
        description="The tuned adapter beats the champion (or the base model when there is none; "
                    "for a candidate that already is the champion, the champion before it or the base "
                    "model) by the configured margin on the task's primary metric.")(beats_champion)


def build_evaluation_checks(task: TaskRef) -> list[dg.AssetChecksDefinition]:
    """The promotion gate on the task's eval_report."""
    return [promotion_gate_check(task)]


def beats_champion(eval_report: dict) -> dg.AssetCheckResult:
    gate = eval_report["gate"]
    return dg.AssetCheckResult(
        passed=bool(gate["passed"]),
        severity=dg.AssetCheckSeverity.ERROR,
        description=gate["reason"],
        metadata={
            "primary_metric": gate["primary_metric"],
            "candidate": float(gate["candidate"]),
            "baseline": float(gate["baseline"]),
            "baseline_name": gate["baseline_name"],
            # champion, previous champion or base model: never the candidate itself
            "baseline_role": gate["baseline_role"],
            "margin": float(gate["margin"]),
            "delta": float(gate["candidate"]) - float(gate["baseline"]),
        },
    )
