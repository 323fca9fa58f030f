"""`genops demo`: the whole loop on the embedded defaults, with progress lines in the terminal,
the full Dagster log in a file, and a closing summary built from the run's own events.

The job runs in a `dagster job execute` subprocess (its DEBUG lines go to
``<data dir>/logs/<job>-<time>.log``); this process follows the run in the Dagster event log
and prints one line per step and the steps' own progress messages. The summary reads the
run's materializations (report paths, gate, endpoint), asks the endpoint about a held-out
golden example of the demo's task with the request it prints as a curl command, and checks
that the answer fits the task's output schema.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from genops_assets.cli.home import REPO, bin_path, demo_task, init_home, task_job, write_task_run_config
from genops_assets.cli.progress import RunEvent, RunProgress, duration

# The demo's sizing of the loop (tuning budget, evaluation batch, executor): a run config, so
# the defaults every other run gets stay as they are.
DEMO_RUN_CONFIG = Path(__file__).with_name("demo_run_config.yaml")


@dataclass
class JobRun:
    """A finished `dagster job execute` run, as this process saw it."""

    job: str
    returncode: int
    run_id: str | None
    log_file: Path
    wall_s: float
    step_s: dict[str, float] = field(default_factory=dict)
    materializations: dict[str, dict[str, Any]] = field(default_factory=dict)
    failure: str | None = None


def _event(entry) -> RunEvent | None:
    """The progress display's view of one Dagster event log entry (None: not shown)."""
    import logging

    ev = entry.dagster_event
    if ev is None:
        if entry.level < logging.INFO:
            return None
        return RunEvent(entry.timestamp, "LOG", entry.step_key, entry.user_message or "")
    message = ev.message or ""
    if ev.is_step_failure and ev.step_failure_data:
        message = _failure_message(ev.step_failure_data) or message
    return RunEvent(entry.timestamp, ev.event_type_value, ev.step_key, message)


def _failure_message(data) -> str | None:
    """What went wrong in a failed step: a raised dg.Failure's description, else the innermost
    cause of the error (Dagster wraps the asset's exception in its own)."""
    if data.user_failure_data is not None and data.user_failure_data.description:
        return data.user_failure_data.description
    error = data.error
    while error is not None and error.cause is not None:
        error = error.cause
    return error.message.strip() if error is not None else None


def _metadata_values(materialization) -> dict[str, Any]:
    return {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}


def run_dagster(name: str, args: list[str], root: Path, out=sys.stdout) -> JobRun:
    """Run ``dagster <args>`` (a job execute or an asset materialize) in a subprocess with its
    output in a log file, print the run's progress, and collect its step times and
    materializations from the event log."""
    import dagster as dg

    # The instance (and its SQLite storage) exists before the subprocess writes to it.
    instance = dg.DagsterInstance.get()
    log_file = root / "logs" / f"{name}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    since = datetime.fromtimestamp(started - 1, tz=UTC)
    run_id: str | None = None
    progress: RunProgress | None = None
    cursor = None
    result = JobRun(name, -1, None, log_file, 0.0)
    print(f"Dagster's full log: {log_file}", file=out, flush=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen([bin_path("dagster"), *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        while True:
            exited = proc.poll() is not None
            if run_id is None:
                # This process starts the only run of the local instance in the meantime
                # (make demo runs no daemon).
                runs = instance.get_runs(filters=dg.RunsFilter(created_after=since), limit=1)
                if runs:
                    run_id = runs[0].run_id
                    plan = instance.get_execution_plan_snapshot(runs[0].execution_plan_snapshot_id)
                    progress = RunProgress(len(plan.step_keys_to_execute), started)
            if run_id is not None and progress is not None:
                conn = instance.get_records_for_run(run_id, cursor=cursor)
                cursor = conn.cursor
                for record in conn.records:
                    event = _event(record.event_log_entry)
                    if event is None:
                        continue
                    if event.kind == "STEP_FAILURE" and result.failure is None:
                        result.failure = f"{event.step_key}: {event.message.strip()}"
                    for line in progress.feed(event):
                        print(line, file=out, flush=True)
                    if event.kind == "ASSET_MATERIALIZATION":
                        mat = record.event_log_entry.asset_materialization
                        result.materializations[mat.asset_key.path[-1]] = _metadata_values(mat)
                if conn.has_more:
                    continue
            if exited:
                break
            time.sleep(1.0)
    result.returncode = proc.returncode
    result.run_id = run_id
    result.wall_s = time.time() - started
    result.step_s = dict(progress.durations) if progress else {}
    return result


def run_job(job: str, root: Path, run_config: Path | None = None, out=sys.stdout) -> JobRun:
    args = ["job", "execute", "-m", "genops_assets.definitions", "-j", job]
    return run_dagster(job, args + (["-c", str(run_config)] if run_config else []), root, out)


def demo(job: str = "genops_loop", run_config: Path | None = DEMO_RUN_CONFIG, task: str | None = None) -> int:
    """Run one task's ``job`` (GENOPS_TASK unless ``task`` is given); ``run_config`` names steps
    by their bare names (``eval_report``), the task's job by ``<task>__eval_report``."""
    root = init_home()
    task_ref = demo_task(task)
    job = task_job(job, task_ref.name)
    print(f"genops demo: job '{job}'" + (f" with run config {run_config}" if run_config else "")
          + f", data directory {root}", flush=True)
    from genops_assets.cli.endpoint import stop

    if run_config is not None:
        run_config = write_task_run_config(run_config, task_ref.name, root / "logs" / f"{job}.run_config.yaml")
    try:
        run = run_job(job, root, run_config)
        if run.returncode != 0:
            print(f"\ngenops demo: job '{job}' FAILED after {duration(run.wall_s)} (exit {run.returncode})"
                  + (f": {run.failure}" if run.failure else "")
                  + f"\n  full log: {run.log_file}\n  runs: make ui -> Runs", file=sys.stderr)
            return run.returncode
        return print_summary(root, run, task_ref)
    finally:
        # The judge serves the run's AutoSxS only (about 2 GB); it starts again when a run needs it.
        stop(("judge",))


# -- the closing summary -------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """A held-out golden example of the demo's task and the request that asks the endpoint."""

    example_id: str
    input_text: str
    reference: dict[str, Any]
    body: dict[str, Any]


def demo_example(spec, predictions_file: Path) -> Example:
    """The first golden example whose evaluated candidate answer fits the task's schema, as a
    chat request to the task's model (its champion, named like the task) that lets the endpoint
    render the task's deployed prompt around the input (`prompt_variables`): the champion was
    tuned with that prompt. The endpoint answers greedily as the offline evaluation did
    (serving parity), so the printed request gets a schema-valid answer."""
    from genops_assets.lib.formatting import prompt_variables
    from genops_assets.lib.jsonl import read_jsonl

    candidate = [p for p in read_jsonl(predictions_file) if str(p.get("model", "")).startswith("candidate")]
    if not candidate:
        raise ValueError(f"{predictions_file}: no candidate predictions")
    chosen = next((p for p in candidate if schema_problem(spec, p["prediction"]) is None), candidate[0])
    body = {"model": spec.name, "temperature": 0,
            "prompt_variables": prompt_variables(spec, chosen["input"], chosen.get("contexts") or ())}
    return Example(chosen["example_id"], chosen["input"], chosen["reference"], body)


def curl_command(url: str, body: dict[str, Any], api_key_required: bool) -> str:
    """A curl command (bash) that sends ``body`` to the chat-completions route of ``url``."""
    lines = [f"curl -s {url}/chat/completions -H 'Content-Type: application/json'"]
    if api_key_required:
        lines.append('-H "Authorization: Bearer ${GENOPS_API_KEYS%%,*}"')
    lines.append(f"-d {shlex.quote(json.dumps(body, ensure_ascii=False))}")
    return " \\\n        ".join(lines)


def ask(url: str, body: dict[str, Any], api_key: str) -> dict[str, Any]:
    """Send ``body`` as it is, through the official openai client, and return the reply."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=120)
    extra = {k: v for k, v in body.items() if k not in ("model", "messages", "temperature")}
    reply = client.chat.completions.create(model=body["model"], messages=body.get("messages", []),
                                           temperature=body["temperature"], extra_body=extra)
    return reply.model_dump()


def schema_problem(spec, answer: str) -> str | None:
    """Why ``answer`` does not fit the task's output schema (None: it fits)."""
    from genops_assets.lib.formatting import parse_prediction
    from genops_assets.lib.monitoring import answer_object

    parsed = parse_prediction(answer, spec.output_schema.fields)
    if parsed is None:
        return "not a JSON object"
    return "; ".join(map(str, spec.output_schema.errors(answer_object(parsed)))) or None


def stage_lines(step_s: dict[str, float], top: int = 6) -> list[str]:
    """The slowest steps, slowest first, as `name  m:ss` lines."""
    ranked = sorted(step_s.items(), key=lambda kv: kv[1], reverse=True)[:top]
    return [f"{name:<44} {duration(s):>7}" for name, s in ranked]


def report_lines(report_md: Path, limit: int = 40) -> list[str]:
    """The metric table and the gate line of an evaluation report."""
    lines = [ln for ln in report_md.read_text(encoding="utf-8").splitlines()
             if ln.startswith("|") or "gate" in ln.lower()]
    return lines[:limit]


def print_summary(root: Path, run: JobRun, task, out=sys.stdout) -> int:
    """The metrics and gate, the reports, the slowest steps, and the endpoint asked the way the
    printed curl command asks it. Returns 1 when that answer is missing or off-schema."""
    from genops_assets.serving.protection import parse_api_keys
    from resources import build_resources

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    evaluation = run.materializations.get("eval_report", {})
    sxs = run.materializations.get("sxs_evaluation", {})
    deployed = run.materializations.get("deployed_endpoint", {})
    report_html = evaluation.get("report_html")
    if not report_html:
        say(f"\nthe run materialized no eval_report; see {run.log_file}")
        return 1
    report_dir = Path(report_html).parent
    say(f"\nEvaluation on the golden set ({report_html}):")
    say("\n".join("  " + ln for ln in report_lines(report_dir / "report.md")))

    res = build_resources(root)
    spec = task.load()
    endpoint = res["endpoint"]
    example = demo_example(spec, report_dir / "predictions.jsonl")
    rc = 0
    try:
        reply = ask(endpoint.url, example.body, endpoint.client_key())
    except Exception as exc:
        say(f"\nthe endpoint did not answer the example request: {exc}")
        reply, rc = None, 1
    if reply is not None:
        answer = reply["choices"][0]["message"]["content"] or ""
        problem = schema_problem(spec, answer)
        rc = 0 if problem is None else 1
        served = reply.get("genops") or {}
        say(f"\nAsked the endpoint ({served.get('served_by', spec.name)} v{reply.get('system_fingerprint')}, prompt "
            f"v{served.get('prompt_version')}) about golden example {example.example_id} "
            f"of task {spec.name}:\n  {example.input_text}\n  -> {answer}"
            f"\n  reference: {json.dumps(example.reference, ensure_ascii=False)}"
            f"\n  {'schema-valid answer' if problem is None else 'answer does NOT fit the schema: ' + problem}")
    say("\n" + judge_line(run.materializations.get("judge_certificate", {}),
                          sxs.get("judge_certified")))
    say(safety_line(run.materializations.get("safety_report", {})))
    say(card_line(run.materializations.get("model_card", {})))
    queued = run.materializations.get("rating_queue", {}).get("items", 0)
    # The local server asks for a bearer key when GENOPS_API_KEYS lists any.
    keys_required = bool(parse_api_keys(os.environ.get("GENOPS_API_KEYS")))
    say(f"""
genops demo finished in {duration(run.wall_s)}. Slowest steps:
{chr(10).join('  ' + ln for ln in stage_lines(run.step_s))}

  Endpoint (OpenAI-compatible, pid {deployed.get('pid', '?')}): {endpoint.url}
    models: base, {spec.name} (its champion), {spec.name}:challenger, {spec.name}:v<N> (each task alike)
    {curl_command(endpoint.url, example.body, keys_required)}
  Evaluation report:                   {report_html}
  AutoSxS report:                      {sxs.get('report_html', 'not written')}
  Dagster UI (runs, lineage, checks):  make ui  ->  http://127.0.0.1:3000
  MLflow UI (runs, registry, aliases): make ui  ->  http://127.0.0.1:5000
  Full log of this run:                {run.log_file}
  Rate answers ({queued} items queued):   .venv/bin/genops raters add <name>  (prints a token once), then
                                       make feedback  ->  http://127.0.0.1:8090
  Continuous training: drop JSONL/CSV files into {spec.incoming_dir}/ (sensor {spec.name}_incoming_data_sensor).
  The endpoint keeps running until `make stop`; the judge server, which only the run needed, is stopped.
""")
    return rc


def judge_line(certificate: dict, sxs_certified) -> str:
    """What the judge certificate says, and so whether AutoSxS's numbers count."""
    if not certificate:
        return "Judge certificate: not computed (the run materialized no judge_certificate)"
    if certificate.get("certified"):
        return f"Judge certificate: PASSED for {certificate.get('judge')}; AutoSxS's win rate counts."
    failures = certificate.get("failures") or []
    shown = "; ".join(str(f) for f in failures[:3]) + (f"; and {len(failures) - 3} more" if len(failures) > 3 else "")
    marked = "" if sxs_certified is None else " and its report is marked UNCERTIFIED"
    return (f"Judge certificate: FAILED for {certificate.get('judge')} ({shown}).\n  AutoSxS's numbers are shown but"
            f" are not a result{marked}; human labels needed: {certificate.get('labels_needed')}.")


def safety_line(safety: dict) -> str:
    """The safety gate and each attack class's success rate against the candidate."""
    if not safety:
        return "Safety report: not computed (the run materialized no safety_report)"
    return f"{safety['summary']} (suite {safety.get('suite_version')}, guardrails {safety.get('guardrails_version')})"


def card_line(card: dict) -> str:
    """Where the candidate's model and dataset cards are in MLflow (``model_card``'s metadata)."""
    if not card:
        return "Model card: not computed (the run materialized no model_card)"
    return (f"Model card: {card['artifact_uri']}/model_card.md and {len(card['dataset_cards'])} dataset cards "
            f"(MLflow run {card['mlflow_run_id']}, sha256 {card['model_card_sha256'][:12]})")


def enhance() -> int:
    """Prompt enhancement, then the eval report again (cached) with the prompt comparison."""
    root = init_home()
    task = demo_task().name
    for name, args in (("prompt_enhancement", ["job", "execute", "-m", "genops_assets.definitions", "-j",
                                               task_job("prompt_enhancement", task)]),
                       ("eval_report", ["asset", "materialize", "-m", "genops_assets.definitions",
                                        "--select", f"{task}/eval_report"])):
        run = run_dagster(name, args, root)
        if run.returncode != 0:
            print(f"genops enhance: {name} FAILED ({run.failure or 'see the log'}); full log: {run.log_file}",
                  file=sys.stderr)
            return run.returncode
    report_html = run.materializations.get("eval_report", {}).get("report_html")
    if report_html:
        print(f"\nEvaluation report ({report_html}):")
        print("\n".join("  " + ln for ln in report_lines(Path(report_html).with_name("report.md"))))
    return 0
