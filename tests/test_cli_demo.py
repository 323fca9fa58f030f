"""The demo's terminal output: progress lines from a run's events, and the closing summary's
request, curl command and schema check, built from the active task's own data."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from genops_assets.cli.demo import card_line, curl_command, demo_example, judge_line, schema_problem, stage_lines
from genops_assets.cli.progress import RunEvent, RunProgress, clock, duration
from genops_assets.lib.tasks import load_task

REPO = Path(__file__).resolve().parents[1]


def test_steps_are_counted_and_timed():
    p = RunProgress(total_steps=3, started=100.0)
    assert p.feed(RunEvent(101.0, "STEP_START", "raw_task_examples")) == ["[ 0:01] step 1/3 raw_task_examples"]
    assert p.feed(RunEvent(104.0, "STEP_SUCCESS", "raw_task_examples")) == [
        "[ 0:04] step 1/3 raw_task_examples done in 3s"]
    assert p.feed(RunEvent(104.0, "STEP_START", "tuned_adapter")) == ["[ 0:04] step 2/3 tuned_adapter"]
    assert p.feed(RunEvent(229.0, "STEP_SUCCESS", "tuned_adapter")) == [
        "[ 2:09] step 2/3 tuned_adapter done in 2m05s"]
    assert p.durations == {"raw_task_examples": 3.0, "tuned_adapter": 125.0}
    assert p.feed(RunEvent(230.0, "STEP_FAILURE", "eval_report", "ValueError: empty golden set\ntraceback")) == [
        "[ 2:10] step eval_report FAILED: ValueError: empty golden set"]
    assert p.feed(RunEvent(231.0, "ENGINE_EVENT", None, "whatever")) == []


def test_progress_messages_are_throttled_with_an_eta_from_their_rate():
    p = RunProgress(total_steps=10, started=0.0, interval_s=15.0)
    p.feed(RunEvent(0.0, "STEP_START", "eval_report"))
    step = "eval_report"
    first = p.feed(RunEvent(10.0, "LOG", step, "v1: generated 16/104"))
    assert first == ["[ 0:10] step 1/10 eval_report: v1: generated 16/104"]  # no rate yet
    assert p.feed(RunEvent(15.0, "LOG", step, "v1: generated 32/104")) == []  # within the interval
    # 32 more rows in 20 s since the phase began: 56 left -> 35 s
    assert p.feed(RunEvent(30.0, "LOG", step, "v1: generated 48/104")) == [
        "[ 0:30] step 1/10 eval_report: v1: generated 48/104, ETA 35s"]
    assert p.feed(RunEvent(31.0, "LOG", step, "v1: generated 104/104")) == [
        "[ 0:31] step 1/10 eval_report: v1: generated 104/104"]  # the end of a phase shows, once
    assert p.feed(RunEvent(60.0, "LOG", step, "v1: generated 104/104, done")) == []
    # another phase of the same step has its own clock and rate
    assert p.feed(RunEvent(32.0, "LOG", step, "base 0-shot: generated 16/104")) == [
        "[ 0:32] step 1/10 eval_report: base 0-shot: generated 16/104"]


def test_a_message_with_its_own_eta_keeps_it_and_plain_messages_are_not_shown():
    p = RunProgress(total_steps=5, started=0.0, interval_s=0.0)
    p.feed(RunEvent(0.0, "STEP_START", "tuned_adapter"))
    p.feed(RunEvent(5.0, "LOG", "tuned_adapter", "tuning: step 5/50, loss 1.2000, ETA 3m00s"))
    line = p.feed(RunEvent(10.0, "LOG", "tuned_adapter", "tuning: step 10/50, loss 0.9000, ETA 2m40s"))
    assert line == ["[ 0:10] step 1/5 tuned_adapter: tuning: step 10/50, loss 0.9000, ETA 2m40s"]
    assert p.feed(RunEvent(11.0, "LOG", "tuned_adapter", "registered genops-x v1 (alias challenger)")) == []
    assert p.feed(RunEvent(12.0, "LOG", "tuned_adapter", "odd 7/3 ratio")) == []


def test_the_summary_says_whether_the_judge_counts():
    failed = {"certified": False, "judge": "base at http://127.0.0.1:8018/v1", "labels_needed": 30,
              "failures": ["position_consistency: 0.000", "probe_accuracy: 0.000", "human_labels: 0",
                           "human_kappa: n/a"]}
    line = judge_line(failed, False)
    assert "FAILED" in line and "position_consistency: 0.000" in line and "and 1 more" in line
    assert "UNCERTIFIED" in line and "human labels needed: 30" in line
    assert "PASSED" in judge_line({"certified": True, "judge": "j"}, True)
    assert "not computed" in judge_line({}, None)


def test_the_summary_says_when_no_card_was_made():
    assert "not computed" in card_line({})


def test_clock_and_duration():
    assert (clock(0), clock(61.4), clock(3725)) == ("0:00", "1:01", "1:02:05")
    assert (duration(42.4), duration(125), duration(-3)) == ("42s", "2m05s", "0s")


def test_stage_lines_list_the_slowest_steps_first():
    lines = stage_lines({"raw_task_examples": 2.0, "tuned_adapter": 290.0, "eval_report": 75.0}, top=2)
    assert [ln.split()[0] for ln in lines] == ["tuned_adapter", "eval_report"]
    assert lines[0].endswith("4m50s")


EXPENSES_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["category", "amount_eur"],
    "properties": {"category": {"type": "string", "enum": ["travel", "meals", "office"]},
                   "amount_eur": {"type": "number"}},
}


@pytest.fixture
def expenses_task(tmp_path) -> Path:
    """A task folder of another domain: its input field is not `message`."""
    root = tmp_path / "tasks" / "expenses"
    (root / "prompts").mkdir(parents=True)
    (root / "prompts" / "system.txt").write_text("Classify the expense line. Reply with JSON.")
    (root / "prompts" / "user.txt").write_text("{few_shot}Expense line: {line}")
    (root / "output_schema.json").write_text(json.dumps(EXPENSES_SCHEMA))
    (root / "examples.jsonl").write_text(json.dumps({"line": "Taxi to the airport, 38.50", "category": "travel",
                                                     "amount_eur": 38.5}) + "\n")
    (root / "task.yaml").write_text(
        "name: expenses\ninput_field: line\ndata_files: [examples.jsonl]\nschema_file: output_schema.json\n"
        "prompts: {system: prompts/system.txt, user: prompts/user.txt}\nlabel_fields: [category]\n")
    return root.parent


def _predictions(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """An eval report's predictions.jsonl: (model, input, prediction) per row."""
    path.write_text("".join(json.dumps({"model": model, "example_id": f"e-{i}", "input": text,
                                        "reference": {"category": "meals", "amount_eur": 64.2},
                                        "prediction": prediction}) + "\n"
                            for i, (model, text, prediction) in enumerate(rows)))
    return path


def test_the_closing_request_is_the_first_golden_example_answered_within_the_schema(expenses_task, tmp_path):
    spec = load_task(expenses_task, "expenses")
    good = '{"category": "meals", "amount_eur": 64.2}'
    path = _predictions(tmp_path / "predictions.jsonl", [
        ("base (0-shot)", "Taxi to the airport, 38.50", good),  # not the candidate's answer
        ("candidate v1", "Train ticket, 12.00", '{"category": "train"}'),  # outside the schema
        ("candidate v1", "Lunch with the client at Luigi's, 64.20", good),
        ("candidate v1", "Stapler, 9.99", '{"category": "office", "amount_eur": 9.99}'),
    ])
    ex = demo_example(spec, path)
    # the endpoint renders its deployed prompt around the task's own input field
    assert ex.body == {"model": "expenses", "temperature": 0,
                       "prompt_variables": {"line": "Lunch with the client at Luigi's, 64.20"}}
    assert ex.example_id == "e-2" and ex.reference == {"category": "meals", "amount_eur": 64.2}
    with pytest.raises(ValueError, match="no candidate predictions"):
        demo_example(spec, _predictions(tmp_path / "base_only.jsonl", [("base (0-shot)", "x", good)]))


def test_the_curl_command_sends_exactly_the_request_body(expenses_task):
    body = {"model": "expenses", "temperature": 0, "prompt_variables": {"line": "Lunch at Luigi's, 64.20 €"}}
    cmd = curl_command("http://127.0.0.1:8008/v1", body, api_key_required=False)
    argv = shlex.split(cmd.replace("\\\n", " "))
    assert argv[:2] == ["curl", "-s"] and argv[2] == "http://127.0.0.1:8008/v1/chat/completions"
    assert json.loads(argv[argv.index("-d") + 1]) == body
    assert "Authorization" not in cmd
    with_key = shlex.split(curl_command("http://h/v1", body, api_key_required=True).replace("\\\n", " "))
    assert with_key[with_key.index("-H", 4) + 1] == "Authorization: Bearer ${GENOPS_API_KEYS%%,*}"


def test_schema_check_of_the_answer(expenses_task):
    spec = load_task(expenses_task, "expenses")
    assert schema_problem(spec, '{"category": "meals", "amount_eur": 64.2}') is None
    assert schema_problem(spec, "Sure! It is a meal.") == "not a JSON object"
    # the wrong keys a champion answers with when it gets a bare user message
    assert schema_problem(spec, '{"category": "system", "text": "..."}') is not None
    support = load_task(REPO / "tasks", "support_triage")
    assert schema_problem(support, json.dumps({"category": "billing", "priority": "low", "product": "hub",
                                               "summary": "Customer asks about an invoice."})) is None


@pytest.mark.parametrize("task", ["support_triage", "product_qa"])
def test_the_demo_run_config_fits_each_tasks_loop(task, tmp_path):
    """demo_run_config.yaml names steps by asset; written for a task, it is valid for its loop job."""
    import dagster as dg
    import yaml

    from genops_assets.cli.demo import DEMO_RUN_CONFIG
    from genops_assets.cli.home import task_job, write_task_run_config
    from genops_assets.definitions import defs

    job = defs.resolve_job_def(task_job("genops_loop", task))
    assert job.name == f"{task}_genops_loop"
    written = yaml.safe_load(write_task_run_config(DEMO_RUN_CONFIG, task, tmp_path / "cfg.yaml").read_text())
    assert set(written["ops"]) == {f"{task}__eval_report", f"{task}__judge_certificate", f"{task}__safety_report"}
    assert dg.validate_run_config(job, written)
