"""The continuous-training loop end to end, timed (`make ct-demo`).

1. A champion is serving (on first use: the loop with a short tuning budget, "yesterday's model").
2. The Dagster daemon runs the sensors, as in production.
3. Live traffic - support tickets plus a few off-topic questions - reaches the endpoint through
   the openai client. The request-log sensor loads it into the feedback store; declarative
   automation refreshes the monitoring assets (serving metrics, drift, online quality).
4. A reviewer's labels for the live tickets land in ``<home>/feedback/labels/support_triage/``.
5. The feedback sensor fires -> <task>_continuous_training: retrain, evaluate, promote, deploy.
6. The endpoint answers the task's model (`support_triage`, its champion) with the new version.

The run's latency breakdown (detection, queue, data, training, registration, evaluation,
deploy, serving switch) comes from the Dagster event log and goes to
``<home>/ct/breakdown.json`` and ``breakdown.md``. Its own data directory (default
``.genops-ct``) and ports keep it apart from `make demo`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from genops_assets.cli.home import REPO, bin_path, demo_task, task_job, write_task_run_config
from genops_assets.lib.hashing import atomic_write_text
from genops_assets.lib.jsonl import read_jsonl
from resources.paths import GenopsHome

# The demo's traffic and reviewer labels are support tickets: it runs on that task.
CT_TASK = "support_triage"
TASK_DIR = REPO / "tasks" / CT_TASK / "ct_demo"
LABEL_FIELDS = ("category", "priority", "product", "summary")

# Evaluation sized for a demo, the same for the bootstrap champion and every retrain so the
# gate compares like with like (and the cache answers the unchanged parts).
EVAL_CONFIG = {
    "eval_report": {"config": {"max_examples": 40}},
    "sxs_evaluation": {"config": {"max_examples": 12}},
    "judge_certificate": {"config": {"max_probe_examples": 4}},
    "safety_report": {"config": {"per_class": 3, "batch_size": 16}},
}
# "Yesterday's model": a short run on part of the data. It is the starting champion whatever its
# margin over the base model (a short run on 160 examples may not clear the gate on 40 golden
# examples); the gate the demo is about is the retrain's, against it.
BOOTSTRAP_TUNING = {"tuned_adapter": {"config": {"max_steps": 24, "max_train_examples": 160}},
                    "eval_report": {"config": {**EVAL_CONFIG["eval_report"]["config"], "margin": -1.0}}}


def log(msg: str) -> None:
    print(f"[ct-demo {datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def _write_yaml(path: Path, data: dict) -> Path:
    import yaml

    return atomic_write_text(path, yaml.safe_dump(data, sort_keys=True))


def ct_environment(home: Path, port: int, judge_port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "GENOPS_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster"),
        "GENOPS_ENDPOINT_PORT": str(port),
        "GENOPS_JUDGE_PORT": str(judge_port),
        "GENOPS_CT_RUN_CONFIG": str(home / "ct" / "run_config.yaml"),
        # 24 reviewed tickets: one batch triggers one retrain.
        "GENOPS_FEEDBACK_MIN_LABELS": env.get("GENOPS_FEEDBACK_MIN_LABELS", "20"),
        # Off-topic traffic is part of the demo: drift raises an alert, not a second retrain.
        "GENOPS_DRIFT_ACTION": env.get("GENOPS_DRIFT_ACTION", "alert"),
    })
    return env


def _instance():
    import dagster as dg

    return dg.DagsterInstance.get()


def _champion(env: dict[str, str]):
    from resources import build_resources

    res = build_resources(Path(env["GENOPS_HOME"]))
    from resources.tracking import registered_model_name

    name = registered_model_name(demo_task(CT_TASK).name)
    return res, name, res["mlflow"].alias(name, "champion")


def send_traffic(base_url: str, api_key: str, model: str, input_field: str) -> list[dict]:
    """Every ticket and off-topic question once, 4 at a time, to the task's ``model`` (its
    champion) as the deployed prompt's input."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key or "unused", max_retries=2, timeout=300)
    tickets = read_jsonl(TASK_DIR / "live_tickets.jsonl")
    off_topic = read_jsonl(TASK_DIR / "off_topic.jsonl")

    def ask(item: dict) -> dict:
        resp = client.chat.completions.create(
            model=model, messages=[], temperature=0.0,
            extra_body={"prompt_variables": {input_field: item["message"]}})
        return {**item, "request_id": resp.id, "answer": resp.choices[0].message.content,
                "version": resp.system_fingerprint}

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(ask, tickets + off_topic))


def reviewer_labels(answers: list[dict]) -> tuple[list[dict], int]:
    """The reviewer's verdict on each live ticket: the right fields, tied to the request id.
    Returns the label rows and how many answers they correct."""
    from genops_assets.lib.formatting import parse_prediction

    rows, corrected = [], 0
    for a in answers:
        if "category" not in a:  # off-topic: nothing to label
            continue
        truth = {k: a[k] for k in LABEL_FIELDS}
        got = parse_prediction(a["answer"] or "", LABEL_FIELDS, lenient=True) or {}
        if any(got.get(k) != truth[k] for k in ("category", "priority", "product")):
            corrected += 1
        rows.append({"request_id": a["request_id"], "input": a["message"], "output": truth,
                     "labeler": "ct-demo reviewer"})
    return rows, corrected


def drop_labels(home: Path, rows: list[dict]) -> Path:
    target = GenopsHome(root=str(home)).task_labels_dir(CT_TASK) / f"review-{datetime.now(UTC):%Y%m%dT%H%M%S}.jsonl"
    # the sensor sees whole files only (the temp file is hidden and not .jsonl)
    return atomic_write_text(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def wait_idle(instance, timeout_s: float, since: float) -> None:
    """Until no run created after ``since`` is queued, starting or running."""
    import dagster as dg

    active = {dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
              dg.DagsterRunStatus.STARTED}
    deadline = time.monotonic() + timeout_s
    seen_any = False
    quiet_since = None
    while time.monotonic() < deadline:
        records = instance.get_run_records(dg.RunsFilter(
            created_after=datetime.fromtimestamp(since, tz=UTC)))
        busy = [r for r in records if r.dagster_run.status in active]
        seen_any = seen_any or bool(records)
        if not busy:
            quiet_since = quiet_since or time.monotonic()
            # automation chains runs a tick (30 s) apart: wait for a quiet spell longer than two ticks
            if seen_any and time.monotonic() - quiet_since > 70:
                return
        else:
            quiet_since = None
        time.sleep(3)
    raise TimeoutError(f"runs still active after {timeout_s:.0f}s")


def wait_for_run(instance, tag: tuple[str, str], since: float, timeout_s: float):
    import dagster as dg

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = instance.get_run_records(dg.RunsFilter(
            tags={tag[0]: tag[1]}, created_after=datetime.fromtimestamp(since, tz=UTC)))
        if records:
            return records[0]
        time.sleep(1)
    raise TimeoutError(f"no run tagged {tag[0]}={tag[1]} within {timeout_s:.0f}s: is the sensor running?")


def wait_finished(instance, run_id: str, timeout_s: float):
    import dagster as dg

    deadline = time.monotonic() + timeout_s
    last_step = None
    while time.monotonic() < deadline:
        record = instance.get_run_record_by_id(run_id)
        status = record.dagster_run.status
        if status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
            return record
        starts = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)
        if starts and starts[-1].step_key != last_step:
            last_step = starts[-1].step_key
            log(f"  run {run_id[:8]}: {last_step}")
        time.sleep(3)
    raise TimeoutError(f"run {run_id} not finished after {timeout_s:.0f}s")


def wait_served(base_url: str, api_key: str, model: str, version: str, input_field: str,
                timeout_s: float = 120) -> float:
    """Seconds until the task's ``model`` (its champion) answers from ``version`` (the server
    follows the registry alias)."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key or "unused", max_retries=0, timeout=120)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        resp = client.chat.completions.create(
            model=model, messages=[], max_tokens=4,
            extra_body={"prompt_variables": {input_field: "My camera is offline since this morning."}})
        if str(resp.system_fingerprint) == str(version):
            return time.time()
        time.sleep(1)
    raise TimeoutError(f"the endpoint did not serve {model} v{version} within {timeout_s:.0f}s")


def _stage(step_key: str) -> str:
    """Stage of the breakdown a step belongs to (its key, or its asset's key for a check)."""
    if step_key.startswith("tuned_adapter"):
        return "training"
    # The gate is eval_report_beats_champion.
    if step_key.startswith(("eval_report", "sxs_evaluation", "judge_certificate", "safety_report")):
        return "evaluation"
    if step_key == "deployed_endpoint":
        return "deploy"
    return "data"  # raw examples, dbt, the mart checks, base model, prompts


@dataclass(frozen=True)
class RunTimes:
    """When one run and its steps happened (epoch seconds), and the two durations its assets
    measured themselves; what the breakdown is computed from."""

    run_id: str
    created: float
    started: float
    ended: float
    steps: dict[str, dict[str, float]]  # step key -> {"start": t, "end": t}; no "end" if it never finished
    training_runtime_s: float | None  # tuned_adapter's own runtime_s (None: the whole step is training)
    parity_s: float  # deployed_endpoint's serving-parity check, counted as evaluation


def run_times(instance, record, task: str) -> RunTimes:
    """The timestamps of a run's steps and its assets' timing metadata, from the event log; the
    task's steps (``<task>__<asset>``) and assets (``<task>/<asset>``) by their asset's name."""
    import dagster as dg

    run_id = record.dagster_run.run_id
    steps: dict[str, dict[str, float]] = {}
    for entry in instance.all_logs(run_id, of_type={dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS,
                                                    dg.DagsterEventType.STEP_FAILURE}):
        kind = "start" if entry.dagster_event.event_type == dg.DagsterEventType.STEP_START else "end"
        steps.setdefault(entry.step_key.removeprefix(f"{task}__"), {})[kind] = entry.timestamp

    def meta(asset: str, key: str) -> float | None:
        for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
            mat = entry.asset_materialization
            if mat.asset_key == dg.AssetKey([task, asset]) and key in mat.metadata:
                return float(mat.metadata[key].value)
        return None

    parity = meta("deployed_endpoint", "parity_s")
    return RunTimes(run_id, record.create_timestamp.timestamp(), record.start_time, record.end_time, steps,
                    meta("tuned_adapter", "runtime_s"), 0.0 if parity is None else parity)


def breakdown(instance, record, task: str, labels_at: float, confirmed_at: float) -> dict:
    """Seconds per stage of the continuous-training run ``record`` (see ``stage_breakdown``)."""
    return stage_breakdown(run_times(instance, record, task), labels_at, confirmed_at)


def stage_breakdown(times: RunTimes, labels_at: float, confirmed_at: float) -> dict:
    """Seconds per stage, from the timestamps of the continuous-training run.

    The loop closes when `deployed_endpoint` succeeds: that step has verified through the
    openai client that `champion` answers from the new version. Steps after it (the AutoSxS
    report) are off the serving path and reported apart; ``confirmed_at`` is when the demo's
    own request saw the new version.
    """
    steps = times.steps
    durations = {k: v["end"] - v["start"] for k, v in steps.items() if "start" in v and "end" in v}
    if "deployed_endpoint" not in durations:
        raise ValueError(f"run {times.run_id} has no successful deployed_endpoint step")
    served_at = steps["deployed_endpoint"]["end"]
    on_path = {k: d for k, d in durations.items() if steps[k]["start"] < served_at}
    after = {k: d for k, d in durations.items() if k not in on_path}

    stages = {"data": 0.0, "training": 0.0, "evaluation": 0.0, "deploy": 0.0}
    for key, seconds in on_path.items():
        stages[_stage(key)] += seconds
    training_total = stages.pop("training")
    training = training_total if times.training_runtime_s is None else times.training_runtime_s
    parity = times.parity_s
    first_step = min(v["start"] for v in steps.values())
    out = {
        "run_id": times.run_id,
        "detection_s": times.created - labels_at,
        "queue_s": times.started - times.created,
        "launch_s": first_step - times.started,
        "data_s": stages["data"],
        "training_s": training,
        "registration_s": training_total - training,
        "evaluation_s": stages["evaluation"] + parity,
        "deploy_s": stages["deploy"] - parity,
        "between_steps_s": (served_at - first_step) - sum(on_path.values()),
        "total_s": served_at - labels_at,
        "after_deploy_s": {k: round(v, 2) for k, v in after.items()},
        "confirmed_after_run_s": confirmed_at - times.ended,
        "steps_s": {k: round(v, 2) for k, v in sorted(durations.items(), key=lambda kv: steps[kv[0]]["start"])},
    }
    out["orchestration_overhead_s"] = out["total_s"] - out["training_s"] - out["evaluation_s"]
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in out.items()}


def run_scope(instance, record, job_keys: set[str]) -> dict:
    """What the continuous-training run materialized of its job's assets, what it left alone
    (unchanged since the last run: no new data, no new code), and why, from the run's records."""
    import dagster as dg

    run_id = record.dagster_run.run_id
    done = sorted({e.asset_materialization.asset_key.to_user_string()
                   for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)})
    return {"materialized": done, "skipped_unchanged": sorted(job_keys - set(done)),
            "changed": record.dagster_run.tags.get("genops/changed", "")}


def job_asset_keys(job_name: str) -> set[str]:
    """The assets of one of the code location's jobs (loads the definitions: seconds)."""
    from genops_assets.definitions import defs

    return {k.to_user_string() for k in defs.resolve_job_def(job_name).asset_layer.selected_asset_keys}


def breakdown_markdown(b: dict) -> str:
    rows = [("detection (labels written -> run requested)", "detection_s"),
            ("queue (requested -> run started)", "queue_s"),
            ("launch (run started -> first step)", "launch_s"),
            ("data (raw, dbt, GX checks, base model, prompts)", "data_s"),
            ("training (compute)", "training_s"),
            ("registration (MLflow logging, artifacts, registry)", "registration_s"),
            ("evaluation (compute: eval report, gate, serving parity)", "evaluation_s"),
            ("deploy (challenger load, alias move, champion reload, verified answer from the new version)",
             "deploy_s"),
            ("between steps (executor)", "between_steps_s"),
            ("**total** (labels written -> the endpoint verified serving the new champion)", "total_s"),
            ("**orchestration overhead** (total - training - evaluation)", "orchestration_overhead_s")]
    lines = ["| stage | seconds |", "|---|---:|"] + [f"| {label} | {b[key]:.1f} |" for label, key in rows]
    after = ", ".join(f"{k} {v:.1f} s" for k, v in b["after_deploy_s"].items()) or "none"
    lines.append(f"\nAfter the deploy, off the serving path: {after}. The demo's own request saw the new "
                 f"champion {b['confirmed_after_run_s']:.1f} s after the run ended.")
    if "materialized" in b:
        lines.append(f"\nThe run materialized {len(b['materialized'])} of the job's "
                     f"{len(b['materialized']) + len(b['skipped_unchanged'])} assets; unchanged, not run: "
                     f"{', '.join(b['skipped_unchanged']) or 'none'}. Changed: {b['changed'] or 'not recorded'}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genops ct-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=os.environ.get("GENOPS_CT_HOME") or str(REPO / ".genops-ct"))
    parser.add_argument("--port", type=int, default=8028)
    parser.add_argument("--judge-port", type=int, default=8038)
    parser.add_argument("--keep", action="store_true", help="leave the endpoint and judge running")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the previous ct-demo state (by default each run starts from an empty data "
                             "directory: the same reviewed tickets again would add no new training data)")
    args = parser.parse_args(argv)
    home = Path(args.home).resolve()
    marker = home / "ct" / "CT_DEMO_HOME"
    if home.exists() and not args.reuse:
        if not marker.exists():
            log(f"{home} exists and was not made by ct-demo: refusing to empty it (pass --home)")
            return 2
        subprocess.call([sys.executable, "-m", "genops_assets.cli", "stop"],
                        env={**os.environ, "GENOPS_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}, cwd=REPO)
        shutil.rmtree(home)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("data directory of `make ct-demo`; emptied at the start of each run\n")
    env = ct_environment(home, args.port, args.judge_port)
    os.environ.update({k: env[k] for k in ("GENOPS_HOME", "DAGSTER_HOME", "GENOPS_ENDPOINT_PORT",
                                           "GENOPS_JUDGE_PORT", "GENOPS_CT_RUN_CONFIG")})
    subprocess.run([sys.executable, "-m", "genops_assets.cli", "init-home"], env=env, check=True, cwd=REPO)
    _write_yaml(home / "ct" / "run_config.yaml", {"ops": EVAL_CONFIG})
    started = time.monotonic()

    res, model_name, champion = _champion(env)
    if champion is None:
        log("no champion yet: training yesterday's model (short budget), evaluating and deploying it")
        task = demo_task(CT_TASK).name
        cfg = write_task_run_config({"ops": {**EVAL_CONFIG, **BOOTSTRAP_TUNING}}, task, home / "ct" / "bootstrap.yaml")
        rc = subprocess.call([bin_path("dagster"), "job", "execute", "-m", "genops_assets.definitions",
                              "-j", task_job("genops_loop", task), "-c", str(cfg)], env=env, cwd=REPO)
        if rc != 0:
            log(f"bootstrap run failed (exit {rc})")
            return rc
        res, model_name, champion = _champion(env)
    endpoint = res["endpoint"]
    value = json.loads(champion.tags["genops.asset_value"])
    task_name = demo_task(CT_TASK).name
    outcome = endpoint.deploy(value["base_model_path"], task_name, "champion", value["adapter_dir"],
                              str(champion.version))
    base_url = outcome.url
    key = endpoint.client_key()
    log(f"champion: {model_name} v{champion.version}, endpoint {base_url}")

    daemon_log = open(home / "ct" / "daemon.log", "ab")  # noqa: SIM115 - the daemon writes to it until closed below
    daemon = subprocess.Popen([bin_path("dagster-daemon"), "run", "-m", "genops_assets.definitions"], env=env,
                              cwd=REPO, stdout=daemon_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        instance = _instance()
        time.sleep(5)
        input_field = demo_task(CT_TASK).load().input_field
        t_traffic = time.time()
        answers = send_traffic(base_url, key, task_name, input_field)
        log(f"{len(answers)} live requests answered by champion v{answers[0]['version']}; "
            "waiting for the request-log sensor and the monitoring assets")
        wait_idle(instance, timeout_s=900, since=t_traffic)
        _print_monitoring(instance)

        rows, corrected = reviewer_labels(answers)
        labels_at = time.time()
        path = drop_labels(home, rows)
        log(f"reviewer labels: {len(rows)} rows ({corrected} correct a wrong answer) -> {path}")
        record = wait_for_run(instance, ("genops/trigger", "feedback_labels"), labels_at - 1, timeout_s=300)
        log(f"sensor fired: run {record.dagster_run.run_id} ({record.dagster_run.job_name})")
        record = wait_finished(instance, record.dagster_run.run_id, timeout_s=3600)
        if record.dagster_run.status.value != "SUCCESS":
            log(f"continuous-training run ended {record.dagster_run.status.value}: see {home}/ct/daemon.log")
            return 1
        _, _, new_champion = _champion(env)
        if new_champion is None or new_champion.version == champion.version:
            log(f"the retrained model did not beat champion v{champion.version}: nothing promoted")
            return 1
        confirmed_at = wait_served(base_url, key, task_name, new_champion.version, input_field)
        b = breakdown(instance, record, task_name, labels_at, confirmed_at)
        b.update(run_scope(instance, record, job_asset_keys(record.dagster_run.job_name)))
        b.update({"previous_champion": champion.version, "new_champion": new_champion.version,
                  "labels": len(rows), "corrected": corrected,
                  "demo_wall_s": round(time.monotonic() - started, 1)})
        out = home / "ct"
        (out / "breakdown.json").write_text(json.dumps(b, indent=2))
        md = breakdown_markdown(b)
        (out / "breakdown.md").write_text(md)
        log(f"champion v{champion.version} -> v{new_champion.version}; the endpoint serves it")
        print("\nContinuous-training latency breakdown (" + str(out / "breakdown.json") + "):\n" + md, flush=True)
        log("waiting for the monitoring runs the deploy's own requests started")
        wait_idle(instance, timeout_s=900, since=labels_at)
        return 0
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
        daemon_log.close()
        if not args.keep:
            subprocess.call([sys.executable, "-m", "genops_assets.cli", "stop"], env=env, cwd=REPO)


def _print_monitoring(instance) -> None:
    import dagster as dg

    for asset, keys in (("serving_metrics", ("request_count", "latency_p50_s", "latency_p95_s", "error_rate")),
                        ("prompt_drift", ("live", "flagged", "flagged_share", "drift")),
                        ("online_quality", ("version", "live_n", "live_mean", "offline_mean", "regression"))):
        entry = instance.get_latest_materialization_event(dg.AssetKey([demo_task(CT_TASK).name, asset]))
        if entry is None:
            log(f"  {asset}: not materialized")
            continue
        md = entry.asset_materialization.metadata
        shown = ", ".join(f"{k}={md[k].value}" for k in keys if k in md)
        log(f"  {asset} [{entry.asset_materialization.partition}]: {shown}")


if __name__ == "__main__":
    raise SystemExit(main())
