"""Hot reload under load: the server follows the registry's `champion` alias (promotion, then a
rollback that moves it back) while clients keep sending requests, and none fails. Canary
routing sends a share of `champion` traffic to `challenger` and says which one answered."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import openai
import pytest
from graph_support import free_port
from openai import OpenAI

from genops_assets.lib.hashing import file_digests, sha256_json
from genops_assets.serving import control
from resources.tracking import MlflowTracking

pytestmark = pytest.mark.server

MSG = [{"role": "user", "content": "my camera is offline"}]
MODEL = "genops-reload_test"


def register(tracking: MlflowTracking, adapter_dir, n: int) -> str:
    run = tracking.start_run("reload-test", f"adapter-{n}", tags={})
    tracking.log_artifacts(run, adapter_dir, "adapter")
    mv = tracking.register(MODEL, tracking.artifact_uri(run, "adapter"), run,
                           tags={"genops.adapter_digest": sha256_json(file_digests(adapter_dir))})
    tracking.end_run(run)
    return mv.version


def served_version(url: str) -> str | None:
    models = json.loads(urllib.request.urlopen(f"{url}/v1/models", timeout=5).read())["data"]
    return next((m["version"] for m in models if m["id"] == "champion"), None)


def wait_for(url: str, version: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if served_version(url) == version:
            return
        time.sleep(0.2)
    raise AssertionError(f"champion never became v{version} (serving v{served_version(url)})")


def test_alias_moves_under_load_without_a_failed_request(tmp_path, tiny_model_dir, tiny_adapter_dir):
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                              artifact_root=(tmp_path / "artifacts").as_uri())
    v1 = register(tracking, tiny_adapter_dir, 1)
    v2 = register(tracking, tiny_adapter_dir, 2)
    tracking.set_alias(MODEL, "champion", v1)
    state_dir = tmp_path / "endpoint"
    state = control.start_server(
        str(tiny_model_dir), {"champion": str(tiny_adapter_dir)}, {"champion": v1}, state_dir, port=free_port(),
        extra_args=["--watch-registry", tracking.tracking_uri, "--watch-model", MODEL,
                    "--watch-alias", "champion=champion", "--watch-interval-s", "0.3"],
        env={"GENOPS_API_KEYS": ""}, ready_timeout_s=180)
    try:
        client = OpenAI(base_url=f"{state.url}/v1", api_key="x", max_retries=0, timeout=60)
        stop, errors, seen = threading.Event(), [], []

        def traffic():
            while not stop.is_set():
                try:
                    r = client.chat.completions.create(model="champion", messages=MSG, max_tokens=4, temperature=0)
                    seen.append(r.system_fingerprint)
                except Exception as exc:
                    errors.append(repr(exc))

        threads = [threading.Thread(target=traffic) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        tracking.set_alias(MODEL, "champion", v2)  # promotion
        wait_for(state.url, v2)
        time.sleep(1.0)
        tracking.set_alias(MODEL, "champion", v1)  # rollback is an alias move
        wait_for(state.url, v1)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        assert {v1, v2} <= set(seen) and len(seen) > 12
        log = [json.loads(x) for x in (state_dir / "requests.jsonl").read_text().splitlines()]
        assert [e["version"] for e in log if e.get("event") == "reload"] == [v2, v1]

        # Any registry version can be asked for by name; an unknown one is a 404.
        r = client.chat.completions.create(model=f"v{v2}", messages=MSG, max_tokens=2)
        assert r.system_fingerprint == v2
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.chat.completions.create(model="v99", messages=MSG, max_tokens=2)
    finally:
        control.stop_server(state_dir)


@pytest.mark.parametrize("share", [0.5])
def test_canary_routes_a_share_of_champion_traffic_to_challenger(tmp_path, tiny_model_dir, tiny_adapter_dir, share):
    state_dir = tmp_path / "endpoint"
    state = control.start_server(
        str(tiny_model_dir), {"champion": str(tiny_adapter_dir), "challenger": str(tiny_adapter_dir)},
        {"champion": "1", "challenger": "2"}, state_dir, port=free_port(),
        extra_args=["--canary-share", str(share)], env={"GENOPS_API_KEYS": ""}, ready_timeout_s=180)
    try:
        client = OpenAI(base_url=f"{state.url}/v1", api_key="x", max_retries=0, timeout=60)
        replies = [client.chat.completions.create(model="champion", messages=MSG, max_tokens=2) for _ in range(40)]
        by = [(r.model_extra.get("genops") or {}).get("served_by", "champion") for r in replies]
        assert 5 <= by.count("challenger") <= 35 and by.count("champion") >= 5
        assert all(r.system_fingerprint == ("2" if b == "challenger" else "1")
                   for r, b in zip(replies, by, strict=True))
        # Only champion traffic is split: challenger and base are answered by themselves.
        assert "genops" not in (client.chat.completions.create(model="base", messages=MSG, max_tokens=2)
                                .model_extra or {})
        log = [json.loads(x) for x in (state_dir / "requests.jsonl").read_text().splitlines() if x.strip()]
        assert sum(e.get("served_by") == "challenger" for e in log) == by.count("challenger")
    finally:
        control.stop_server(state_dir)
