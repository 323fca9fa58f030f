"""Build the genops definitions against a temporary data directory, for in-process runs."""

from __future__ import annotations

import base64
import contextlib
import math
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import dagster as dg

from genops_assets.definitions import graph_definitions
from genops_assets.lib.tasks import SHARED_STEPS, TaskRef, task_run_config
from resources import build_resources

TASK = "support_triage"
REPO = Path(__file__).resolve().parents[1]


def key(name: str, task: str = TASK) -> str:
    """A task asset's key as a string (``support_triage/eval_report``)."""
    return f"{task}/{name}"


def node(name: str, task: str = TASK) -> str:
    """The step (op) name of a task's asset (``support_triage__eval_report``)."""
    return TaskRef(task, "").step(name)


def select(*names: str, task: str = TASK) -> dg.AssetSelection:
    """Assets of ``task`` by name; shared assets (``base_model``) by their own key."""
    return dg.AssetSelection.assets(*(n if n in SHARED_STEPS else dg.AssetKey([task, n]) for n in names))


def task_selection(task: str = TASK) -> dg.AssetSelection:
    """Everything of ``task`` and the shared base model, except the stages with jobs of their
    own (monitoring, preference tuning, judge tuning), as the loop job selects."""
    from genops_assets.defs.jobs import OUTSIDE_LOOP

    return ((dg.AssetSelection.key_prefixes([task]) | dg.AssetSelection.assets("base_model"))
            - dg.AssetSelection.groups(*(f"{task}_{stage}" for stage in OUTSIDE_LOOP)))


@contextlib.contextmanager
def genops_env(**values: str) -> Iterator[None]:
    """``GENOPS_<NAME>`` variables set for the block, then restored."""
    names = {f"GENOPS_{k.upper()}": v for k, v in values.items()}
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, user: str | None = None, password: str | None = None, host: str | None = None) -> int:
    """The HTTP status of a GET (basic auth and a Host header when given); 0 while nothing listens."""
    headers = {}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    if host is not None:
        headers["Host"] = host
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


@contextlib.contextmanager
def http_server(cmd: Sequence[str], ready_url: str, log_path: Path, timeout_s: float,
                env: dict[str, str] | None = None, cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """A server process in its own session, its output in ``log_path``; yields it once
    ``ready_url`` answers 200, and stops the whole session (the server and its workers) on exit.
    A server that exits or is not ready in ``timeout_s`` fails with the tail of its log."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while http_status(ready_url) != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    why = f"exited with {proc.returncode}" if proc.returncode is not None else \
                        f"did not answer within {timeout_s:.0f} s"
                    raise AssertionError(f"{cmd[0]} {' '.join(cmd[1:3])} {why} ({ready_url}):\n"
                                         + log_path.read_text(errors="replace")[-3000:])
                time.sleep(0.5)
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


def load_graph(home: Path, tasks_dir: Path | None = None, resources: dict | None = None,
               **resource_args) -> dg.Definitions:
    """The code location's graph (every task folder of ``tasks_dir``, default tasks/) over the
    data directory ``home``: the defs folder as the code location loads it, with ``resources``
    (default: genops' resources on ``home`` and ``tasks_dir``, built with ``resource_args``;
    nothing is started until a run asks for it)."""
    with genops_env(home=str(home), tasks_dir=str(tasks_dir or REPO / "tasks")):
        graph = graph_definitions()
        resources = resources or build_resources(home=home, **resource_args)
    return dg.Definitions.merge(graph, dg.Definitions(resources=resources))


def make_defs(home: Path, port: int, tasks_dir: Path | None = None) -> dg.Definitions:
    return load_graph(home, tasks_dir, port=port, judge_port=free_port())


def loop_job(defs: dg.Definitions, task: str = TASK, job: str = "genops_loop") -> dg.JobDefinition:
    return defs.resolve_job_def(f"{task}_{job}")


# One red-team case per attack class, short answers: the safety report in seconds.
TINY_SAFETY = {"per_class": 1, "max_new_tokens": 8, "batch_size": 8}


def tiny_run_config(model_dir: Path, steps: int = 2, examples: int = 4, margin: float = -1.0,
                    task: str = TASK) -> dict:
    """Seconds-long settings: the tiny model, a few steps, a few golden examples, for ``task``'s job.

    The default margin of -1 opens the gate for tests of the stages after it (deployment,
    prompts, RAG); tests of the gate itself pass a margin set from ``probe_eval_report``.
    """
    return task_run_config(task, {
        "ops": {
            "base_model": {"config": {"model_path": str(model_dir)}},
            "tuned_adapter": {"config": {"max_steps": steps, "max_train_examples": 8, "batch_size": 2,
                                         "eval_every": 0, "save_every": 1, "log_every": 1, "rank": 4, "alpha": 8}},
            "eval_report": {"config": {"max_examples": examples, "batch_size": 4, "margin": margin,
                                       "base_few_shot": 1}},
            "sxs_evaluation": {"config": {"max_examples": examples}},
            "judge_certificate": {"config": {"max_probe_examples": examples}},
            "safety_report": {"config": TINY_SAFETY},
        }
    })


def events_by_type(result, event_type: dg.DagsterEventType):
    return [e for e in result.all_events if e.event_type == event_type]


def check_results(result) -> dict[str, bool]:
    out = {}
    for e in events_by_type(result, dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        data = e.event_specific_data
        out[data.check_name] = data.passed
    return out


def materialized_keys(result) -> set[str]:
    return {e.asset_key.to_user_string() for e in events_by_type(result, dg.DagsterEventType.ASSET_MATERIALIZATION)}


def materialized(result, task: str = TASK) -> set[str]:
    """Names of the assets of ``task`` (``eval_report``) and of the shared assets (``base_model``)
    the run materialized."""
    keys = [e.asset_key.path for e in events_by_type(result, dg.DagsterEventType.ASSET_MATERIALIZATION)]
    return {path[-1] for path in keys if len(path) == 1 or path[0] == task}


def probe_eval_report(job: dg.JobDefinition, instance: dg.DagsterInstance, run_config: dict,
                      task: str = TASK) -> dict:
    """Materialize ``job``'s assets up to ``eval_report`` (nothing is deployed) and return its
    value, whose gate holds the candidate's paired improvement interval over the base model.

    The trained adapter (same version key) and the answers (call cache) are reused by a later
    run of the whole job in the same data directory, so a gate test can set its margin from
    the measured interval at little cost.
    """
    selected = dg.AssetSelection.assets(dg.AssetKey([task, "eval_report"])).upstream().resolve(
        job.asset_layer.asset_graph)
    names = {node(k.path[-1], task) for k in selected}
    ops = run_config["ops"]
    # The gate's blocking check fails the run when the bound is below the margin: not an error here.
    result = job.execute_in_process(run_config={"ops": {k: v for k, v in ops.items() if k in names}},
                                    instance=instance, asset_selection=list(selected), raise_on_error=False)
    if key("eval_report", task) not in materialized_keys(result):
        raise AssertionError("the probe run did not materialize eval_report")
    report = result.output_for_node(node("eval_report", task))
    if report["gate"]["improvement_low"] is None:
        raise AssertionError(f"the gate did not use the paired interval: {report['gate']['reason']}")
    return report


def same_numbers(a, b) -> bool:
    """Equal structures whose floats agree to 1e-6. Two identical judge prompts judged in one
    run (base and candidate answered alike) can land in differently composed batches, with or
    without a cached prefix, and differ in the last float digits; the cache then holds one."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_numbers(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_numbers(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
    return a == b


def register_version(tracking, prompt_ref, adapter_dir: Path, base_dir: Path, task: str = "support_triage") -> str:
    """Register ``adapter_dir`` as a version of the task's model through the calls tuned_adapter
    makes (an MLflow model in a tracking run, then a registry version); returns the version."""
    from genops_assets.lib.hashing import file_digests, sha256_dir, sha256_json
    from resources.tracking import registered_model_name

    digest = sha256_json(file_digests(adapter_dir))
    tags = {"genops.adapter_digest": digest}
    base = {"path": str(base_dir), "folder_digest": sha256_dir(base_dir)}
    with tracking.run(f"genops/{task}", "sft", {}) as run_id:
        model = tracking.log_version_model(run_id, adapter_dir, prompt_ref, base, tags)
        mv = tracking.register_adapter(registered_model_name(task), model, digest, tags,
                                       {"adapter_dir": str(adapter_dir), "model_id": model.model_id}, "test adapter")
    return mv.version


def register_adapter_folder(tracking, task: str, adapter_dir: Path, n: int) -> str:
    """Register ``adapter_dir`` as a bare adapter folder version of ``genops-<task>`` (a tracking
    run's artifact with its digest tag, as a manual registration would); returns the version."""
    from genops_assets.lib.hashing import file_digests, sha256_json
    from resources.tracking import registered_model_name

    run = tracking.start_run("reload-test", f"{task}-adapter-{n}", tags={})
    tracking.log_artifacts(run, adapter_dir, "adapter")
    mv = tracking.register(registered_model_name(task), tracking.artifact_uri(run, "adapter"), run,
                           tags={"genops.adapter_digest": sha256_json(file_digests(adapter_dir))})
    tracking.end_run(run)
    return mv.version
