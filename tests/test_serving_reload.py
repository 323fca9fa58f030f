"""Hot reload under load, per task: the server follows the registry's `champion` alias of every
task's registered model (a promotion, then a rollback that moves it back) while clients keep
sending requests to two tasks, and none fails; the other task is never reloaded. Canary routing
sends a share of a task's champion traffic to its challenger and says which one answered."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import openai
import pytest
from graph_support import free_port, register_adapter_folder
from openai import OpenAI

from genops_assets.serving import control
from resources.tracking import MlflowTracking, registered_model_name

pytestmark = pytest.mark.server

MSG = [{"role": "user", "content": "my camera is offline"}]
MOVED, STILL = "reload_a", "reload_b"  # the task whose champion moves, and one that stays


def served_version(url: str, model: str) -> str | None:
    models = json.loads(urllib.request.urlopen(f"{url}/v1/models", timeout=5).read())["data"]
    return next((m["version"] for m in models if m["id"] == model), None)


def wait_for(url: str, model: str, version: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if served_version(url, model) == version:
            return
        time.sleep(0.2)
    raise AssertionError(f"{model} never became v{version} (serving v{served_version(url, model)})")


def test_alias_moves_under_load_without_a_failed_request(tmp_path, tiny_model_dir, tiny_adapters):
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                              artifact_root=(tmp_path / "artifacts").as_uri())
    v1 = register_adapter_folder(tracking, MOVED, tiny_adapters(1), 1)
    v2 = register_adapter_folder(tracking, MOVED, tiny_adapters(2), 2)
    still = register_adapter_folder(tracking, STILL, tiny_adapters(3), 1)
    tracking.set_alias(registered_model_name(MOVED), "champion", v1)
    tracking.set_alias(registered_model_name(STILL), "champion", still)
    state_dir = tmp_path / "endpoint"
    state = control.start_server(
        str(tiny_model_dir), {MOVED: str(tiny_adapters(1)), STILL: str(tiny_adapters(3))}, {MOVED: v1, STILL: still},
        state_dir, port=free_port(),
        extra_args=["--watch-registry", tracking.tracking_uri, "--watch-prefix", registered_model_name(""),
                    "--watch-interval-s", "0.3", "--pinned-versions", "1"],
        env={"GENOPS_API_KEYS": ""}, ready_timeout_s=180)
    try:
        client = OpenAI(base_url=f"{state.url}/v1", api_key="x", max_retries=0, timeout=60)
        stop, errors, seen = threading.Event(), [], {MOVED: [], STILL: []}

        def traffic(task: str):
            while not stop.is_set():
                try:
                    r = client.chat.completions.create(model=task, messages=MSG, max_tokens=4, temperature=0)
                    seen[task].append((r.system_fingerprint, r.choices[0].message.content))
                except Exception as exc:
                    errors.append(repr(exc))

        threads = [threading.Thread(target=traffic, args=(task,)) for task in (MOVED, MOVED, MOVED, STILL, STILL)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        tracking.set_alias(registered_model_name(MOVED), "champion", v2)  # promotion
        wait_for(state.url, MOVED, v2)
        time.sleep(1.0)
        tracking.set_alias(registered_model_name(MOVED), "champion", v1)  # rollback is an alias move
        wait_for(state.url, MOVED, v1)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        assert {v1, v2} <= {v for v, _ in seen[MOVED]} and len(seen[MOVED]) > 12
        # The other task answered from its one version throughout, the same answer each time.
        assert len(seen[STILL]) > 4 and len(set(seen[STILL])) == 1 and seen[STILL][0][0] == still
        log = [json.loads(x) for x in (state_dir / "requests.jsonl").read_text().splitlines()]
        assert [(e["task"], e["version"]) for e in log if e.get("event") == "reload"] == [(MOVED, v2), (MOVED, v1)]

        # Any registry version of a task can be asked for by name; an unknown one is a 404.
        r = client.chat.completions.create(model=f"{MOVED}:v{v2}", messages=MSG, max_tokens=2)
        assert r.system_fingerprint == v2 and r.model_extra["genops"]["served_by"] == f"{MOVED}:v{v2}"
        # One registry version per task stays loaded (--pinned-versions 1): the next one replaces it.
        r = client.chat.completions.create(model=f"{MOVED}:v{v1}", messages=MSG, max_tokens=2)
        assert r.system_fingerprint == v1
        served = {m["id"] for m in json.loads(urllib.request.urlopen(f"{state.url}/v1/models").read())["data"]}
        assert f"{MOVED}:v{v1}" in served and f"{MOVED}:v{v2}" not in served
        log = [json.loads(x) for x in (state_dir / "requests.jsonl").read_text().splitlines()]
        assert [(e["model"], e["version"]) for e in log if e.get("event") == "unload"] == [(f"{MOVED}:v{v2}", v2)]
        assert client.chat.completions.create(model=f"{MOVED}:v{v2}", messages=MSG, max_tokens=2).system_fingerprint \
            == v2  # loaded again on demand
        with pytest.raises(openai.NotFoundError, match="cannot be loaded from the registry"):
            client.chat.completions.create(model=f"{MOVED}:v99", messages=MSG, max_tokens=2)
        with pytest.raises(openai.NotFoundError, match="no task 'unknown_task' is served"):
            client.chat.completions.create(model="unknown_task:v1", messages=MSG, max_tokens=2)
    finally:
        control.stop_server(state_dir)


@pytest.mark.parametrize("share", [0.5])
def test_canary_routes_a_share_of_champion_traffic_to_challenger(tmp_path, tiny_model_dir, tiny_adapter_dir, share):
    state_dir = tmp_path / "endpoint"
    # Two tasks with a challenger each; the canary share is set for one of them only.
    adapters = {name: str(tiny_adapter_dir) for name in ("t", "t:challenger", "u", "u:challenger")}
    state = control.start_server(
        str(tiny_model_dir), adapters, {"t": "1", "t:challenger": "2", "u": "1", "u:challenger": "2"}, state_dir,
        port=free_port(), extra_args=["--canary-shares", f"t={share}"], env={"GENOPS_API_KEYS": ""},
        ready_timeout_s=180)
    try:
        client = OpenAI(base_url=f"{state.url}/v1", api_key="x", max_retries=0, timeout=60)
        replies = [client.chat.completions.create(model="t", messages=MSG, max_tokens=2) for _ in range(40)]
        by = [r.model_extra["genops"]["served_by"] for r in replies]
        assert 5 <= by.count("t:challenger") <= 35 and by.count("t") >= 5
        assert all(r.system_fingerprint == ("2" if b == "t:challenger" else "1")
                   for r, b in zip(replies, by, strict=True))
        # Only t's champion traffic is split: u (no share), challengers and base answer themselves.
        assert {client.chat.completions.create(model="u", messages=MSG, max_tokens=2).model_extra["genops"]
                ["served_by"] for _ in range(10)} == {"u"}
        assert "genops" not in (client.chat.completions.create(model="base", messages=MSG, max_tokens=2)
                                .model_extra or {})
        log = [json.loads(x) for x in (state_dir / "requests.jsonl").read_text().splitlines() if x.strip()]
        assert sum(e.get("served_by") == "t:challenger" for e in log) == by.count("t:challenger")
        assert all(e["task"] == e["served_by"].partition(":")[0] for e in log if e.get("task"))
    finally:
        control.stop_server(state_dir)


def test_registry_watcher_follows_every_task_and_isolates_failures(tmp_path, tiny_adapters):
    """One poll over every `genops-<task>` model: each task whose champion moved is swapped; a
    task with a broken version (digest mismatch) is reported and skipped, never blocking the
    others; a removed task and a model outside the prefix are left alone."""
    from genops_assets.serving.registry_watch import RegistryWatcher

    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                              artifact_root=(tmp_path / "artifacts").as_uri())
    for task in ("good", "broken", "gone"):
        version = register_adapter_folder(tracking, task, tiny_adapters(1), 1)
        tracking.set_alias(registered_model_name(task), "champion", version)
    broken = registered_model_name("broken")
    tracking.client().set_model_version_tag(broken, "1", "genops.adapter_digest", "0" * 64)
    run = tracking.start_run("reload-test", "other", tags={})
    tracking.log_artifacts(run, tiny_adapters(1), "adapter")
    other = tracking.register("someone-elses-model", tracking.artifact_uri(run, "adapter"), run, tags={})
    tracking.end_run(run)
    tracking.set_alias("someone-elses-model", "champion", other.version)

    swapped, versions = [], {"good": None}
    watcher = RegistryWatcher(tracking.tracking_uri, registered_model_name(""), tmp_path / "cache",
                              lambda name, folder, version: swapped.append((name, version)), versions.get,
                              skip=lambda task: task == "gone")
    assert watcher.targets() == {"good": "1", "broken": "1"}
    assert watcher.check_once() == 1
    assert swapped == [("good", "1")] and watcher.errors == {"broken": 1}
    versions["good"] = "1"
    assert watcher.check_once() == 0 and watcher.errors == {"broken": 2}  # retried each poll, still reported
