"""Pieces of `make ct-demo`: the reviewer's labels are valid label rows for the feedback sensor,
the latency breakdown adds up from given timestamps, and the timestamps come from a real run's
event log."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import dagster as dg
import pytest

from genops_assets.cli.demo_ct import (
    TASK_DIR,
    RunTimes,
    breakdown,
    breakdown_markdown,
    reviewer_labels,
    run_times,
    stage_breakdown,
)
from genops_assets.lib.labels import validate_label
from genops_assets.lib.tasks import load_task

TASK = "support_triage"

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


def test_breakdown_by_hand_from_timestamps():
    # Times in quarter seconds, exact in binary floating point, so every sum is exact.
    times = RunTimes(
        run_id="r", created=1005.0, started=1006.5, ended=1030.5,
        steps={
            "raw_task_examples": {"start": 1008.0, "end": 1009.0},
            "tuned_adapter": {"start": 1009.5, "end": 1019.5},
            "eval_report": {"start": 1020.0, "end": 1023.0},
            "eval_report_beats_champion": {"start": 1023.0, "end": 1023.25},
            "deployed_endpoint": {"start": 1023.5, "end": 1026.0},
            "sxs_evaluation": {"start": 1026.5, "end": 1030.0},
        },
        training_runtime_s=8.0, parity_s=1.0,
    )
    b = stage_breakdown(times, labels_at=1000.0, confirmed_at=1032.0)
    expected = {
        "detection_s": 5.0,  # labels written -> run created
        "queue_s": 1.5,
        "launch_s": 1.5,  # run started -> first step
        "data_s": 1.0,
        "training_s": 8.0,  # the asset's own runtime ...
        "registration_s": 2.0,  # ... and the rest of the tuning step
        "evaluation_s": 4.25,  # eval report 3 + gate check 0.25 + serving parity 1
        "deploy_s": 1.5,  # the deploy step without its parity check
        "between_steps_s": 1.25,  # gaps between the steps up to the deploy: 0.5 + 0.5 + 0 + 0.25
        "total_s": 26.0,  # labels written -> deploy step ends
        "confirmed_after_run_s": 1.5,
        "orchestration_overhead_s": 13.75,
    }
    assert {k: b[k] for k in expected} == expected
    assert sum(b[k] for k in expected if k not in ("total_s", "confirmed_after_run_s", "orchestration_overhead_s")) \
        == b["total_s"]
    assert b["after_deploy_s"] == {"sxs_evaluation": 3.5}  # off the serving path, not in the total
    assert list(b["steps_s"]) == list(times.steps)  # in the order they started
    md = breakdown_markdown(b)
    assert "| training (compute) | 8.0 |" in md
    assert "| **orchestration overhead** (total - training - evaluation) | 13.8 |" in md
    assert "sxs_evaluation 3.5 s" in md


def test_breakdown_without_the_training_runtime_counts_the_whole_step_and_needs_a_deploy():
    steps = {"tuned_adapter": {"start": 10.0, "end": 14.0}, "deployed_endpoint": {"start": 14.0, "end": 15.0}}
    b = stage_breakdown(RunTimes("r", 9.0, 9.5, 16.0, steps, None, 0.0), labels_at=8.0, confirmed_at=16.0)
    assert (b["training_s"], b["registration_s"], b["deploy_s"]) == (4.0, 0.0, 1.0)
    failed = {"tuned_adapter": {"start": 10.0, "end": 14.0}, "deployed_endpoint": {"start": 14.0}}
    with pytest.raises(ValueError, match="run r has no successful deployed_endpoint step"):
        stage_breakdown(RunTimes("r", 9.0, 9.5, 16.0, failed, None, 0.0), labels_at=8.0, confirmed_at=16.0)


@dg.asset(key_prefix=[TASK])
def raw_task_examples():
    pass


@dg.asset(key_prefix=[TASK], deps=[raw_task_examples])
def tuned_adapter():
    return dg.MaterializeResult(metadata={"runtime_s": 0.2})


@dg.asset(key_prefix=[TASK], deps=[tuned_adapter])
def deployed_endpoint():
    return dg.MaterializeResult(metadata={"parity_s": 0.15})


def test_run_times_come_from_the_event_log():
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([raw_task_examples, tuned_adapter, deployed_endpoint], instance=instance)
    record = instance.get_run_record_by_id(result.run_id)
    times = run_times(instance, record, TASK)  # the task's steps, as the demo's job names them
    assert times.run_id == result.run_id
    assert (times.training_runtime_s, times.parity_s) == (0.2, 0.15)  # the assets' own metadata
    assert list(times.steps) == ["raw_task_examples", "tuned_adapter", "deployed_endpoint"]
    spans = [(v["start"], v["end"]) for v in times.steps.values()]
    assert times.created <= times.started <= spans[0][0]
    assert all(start <= end for start, end in spans) and spans[-1][1] <= times.ended
    assert all(end <= next_start for (_, end), (next_start, _) in pairwise(spans))
    assert breakdown(instance, record, TASK, 0.0, 0.0) == stage_breakdown(times, 0.0, 0.0)
