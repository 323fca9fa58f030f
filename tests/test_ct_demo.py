"""Pieces of `make ct-demo`: the reviewer's labels are valid label rows for the feedback sensor,
and the latency breakdown adds up from a real run's event log."""

from __future__ import annotations

import json
import time
from pathlib import Path

import dagster as dg
import pytest

from genops_assets.cli.demo_ct import TASK_DIR, breakdown, breakdown_markdown, reviewer_labels
from genops_assets.lib.labels import validate_label
from genops_assets.lib.tasks import load_task

REPO = Path(__file__).resolve().parents[1]


def test_reviewer_labels_fit_the_task_and_count_corrections():
    spec = load_task(REPO / "tasks", "support_triage")
    tickets = [json.loads(line) for line in (TASK_DIR / "live_tickets.jsonl").read_text().splitlines()]
    right = {k: tickets[0][k] for k in ("category", "priority", "product", "summary")}
    answers = [
        {**tickets[0], "request_id": "r1", "answer": json.dumps(right)},
        {**tickets[1], "request_id": "r2", "answer": json.dumps({**right, "priority": "low"})},
        {"message": "How do I boil an egg?", "request_id": "r3", "answer": "{}"},  # off-topic: not labelled
    ]
    rows, corrected = reviewer_labels(answers)
    assert [r["request_id"] for r in rows] == ["r1", "r2"] and corrected == 1
    for ticket in tickets:  # every shipped ticket is a valid label for the sensor
        validate_label({"input": ticket["message"], "output": {k: ticket[k] for k in right}}, spec)


@dg.asset
def raw_task_examples():
    time.sleep(0.05)


@dg.asset(deps=[raw_task_examples])
def tuned_adapter():
    time.sleep(0.3)
    return dg.MaterializeResult(metadata={"runtime_s": 0.2})


@dg.asset(deps=[tuned_adapter])
def eval_report():
    time.sleep(0.1)


@dg.asset(deps=[eval_report])
def deployed_endpoint():
    time.sleep(0.2)
    return dg.MaterializeResult(metadata={"parity_s": 0.15})


@dg.asset(deps=[deployed_endpoint])
def sxs_evaluation():
    time.sleep(0.1)


def test_breakdown_adds_up_from_the_event_log():
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([raw_task_examples, tuned_adapter, eval_report, deployed_endpoint, sxs_evaluation],
                            instance=instance)
    record = instance.get_run_record_by_id(result.run_id)
    created = record.create_timestamp.timestamp()
    b = breakdown(instance, record, labels_at=created - 5.0, confirmed_at=record.end_time + 2.0)
    assert b["detection_s"] == pytest.approx(5.0, abs=0.01)
    assert b["training_s"] == 0.2  # the training's own runtime, from the asset's metadata
    steps = b["steps_s"]
    assert b["registration_s"] == pytest.approx(steps["tuned_adapter"] - 0.2, abs=0.02)
    assert b["evaluation_s"] == pytest.approx(steps["eval_report"] + 0.15, abs=0.02)  # parity counts as evaluation
    assert b["deploy_s"] == pytest.approx(steps["deployed_endpoint"] - 0.15, abs=0.02)
    assert b["confirmed_after_run_s"] == pytest.approx(2.0, abs=0.01)
    assert list(b["after_deploy_s"]) == ["sxs_evaluation"]  # off the serving path, not in the total
    parts = ("detection_s", "queue_s", "launch_s", "data_s", "training_s", "registration_s", "evaluation_s",
             "deploy_s", "between_steps_s")
    assert sum(b[p] for p in parts) == pytest.approx(b["total_s"], abs=0.1)
    assert b["orchestration_overhead_s"] == pytest.approx(b["total_s"] - b["training_s"] - b["evaluation_s"], abs=0.02)
    assert "orchestration overhead" in breakdown_markdown(b)
