"""Secrets come only from the environment and never reach a log or a store: API keys, the judge's
key and MLflow's password, set to unique values, are found nowhere after the loop ran and the
endpoint answered. The endpoint accepts keys configured as sha256 digests, so the server side
needs no plaintext key."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import dagster as dg
import pytest
from graph_support import free_port, genops_env, loop_job, make_defs, node, tiny_run_config

from genops_assets.cli.main import new_key_text
from genops_assets.serving import control
from genops_assets.serving.protection import ApiKeys, key_digest, parse_api_keys
from resources.endpoint import client_api_key


def unique(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def test_keys_configured_as_digests_are_accepted_in_place_of_the_keys():
    key, other = unique("sk"), unique("sk")
    keys = ApiKeys(parse_api_keys(f"{key_digest(key)}, plain-key"))
    assert keys.match(f"Bearer {key}") == 0 and keys.match("Bearer plain-key") == 1
    assert keys.match(f"Bearer {other}") is None and keys.match(f"Bearer {key_digest(key)}") is None
    assert keys.client_id(0) == "key:" + key_digest(key).removeprefix("sha256:")[:16]
    with pytest.raises(ValueError, match="64 hex digits"):
        ApiKeys(["sha256:abc"])


def test_genops_keys_new_prints_a_key_and_the_digest_to_configure():
    lines = new_key_text().splitlines()
    key, digest = lines[0].rsplit(" ", 1)[1], lines[1].rsplit(" ", 1)[1]
    assert key.startswith("gk-") and len(key) > 40 and digest == key_digest(key)
    assert ApiKeys([digest]).match(f"Bearer {key}") == 0
    assert new_key_text().splitlines()[0] != lines[0]  # a new key every time


def test_genops_own_client_key_with_digest_only_configuration():
    key = unique("sk")
    assert client_api_key(f"{key_digest(key)},{key}") == key
    assert client_api_key(key_digest(key), key) == key
    assert client_api_key("") == "local"
    with pytest.raises(ValueError, match="GENOPS_CLIENT_API_KEY"):
        client_api_key(key_digest(key))


def files_holding(root: Path, secrets: dict[str, str]) -> dict[str, list[str]]:
    """The secrets (by name) whose value any file under ``root`` holds, with those files."""
    found: dict[str, list[str]] = {}
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        for name, value in secrets.items():
            if value.encode() in data:
                found.setdefault(name, []).append(str(path.relative_to(root)))
    return found


def post(url: str, key: str | None, body: dict) -> int:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.server
def test_an_endpoint_holding_only_a_digest_serves_the_key_and_logs_no_secret(tiny_model_dir, tiny_adapter_dir,
                                                                             tmp_path, capfd):
    key = unique("sk-endpoint")
    state_dir = tmp_path / "endpoint"
    state = control.start_server(str(tiny_model_dir), {"secrets": str(tiny_adapter_dir)}, {"secrets": "1"},
                                 state_dir, port=free_port(), env={"GENOPS_API_KEYS": key_digest(key)},
                                 ready_timeout_s=180)
    try:
        body = {"model": "secrets", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        url = f"{state.url}/v1/chat/completions"
        assert post(url, key, body) == 200
        assert post(url, None, body) == 401 and post(url, unique("sk-wrong"), body) == 401
    finally:
        control.stop_server(state_dir)
    out = capfd.readouterr()
    assert key not in out.out + out.err
    assert files_holding(tmp_path, {"api key": key}) == {}
    assert any(state_dir.rglob("*.jsonl"))  # the request log was written (and scanned)


@pytest.mark.graph
def test_the_loop_and_the_endpoint_leave_no_secret_in_logs_or_stores(home, tiny_model_dir, tmp_path,
                                                                     monkeypatch, capfd):
    secrets = {"endpoint key": unique("sk-endpoint"), "judge key": unique("sk-judge"),
               "vllm key": unique("sk-vllm"), "mlflow password": unique("mlflow-pw")}
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "genops")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secrets["mlflow password"])
    instance_dir = tmp_path / "dagster"
    instance_dir.mkdir()
    with genops_env(api_keys=key_digest(secrets["endpoint key"]), client_api_key=secrets["endpoint key"],
                    judge_api_key=secrets["judge key"], vllm_api_key=secrets["vllm key"]), \
            dg.DagsterInstance.local_temp(str(instance_dir)) as instance:
        defs = make_defs(home, free_port())
        result = loop_job(defs).execute_in_process(run_config=tiny_run_config(tiny_model_dir), instance=instance)
        assert result.success
        deployed = result.output_for_node(node("deployed_endpoint"))
        assert deployed["version"] == "1"
        url = deployed["url"]
        body = {"model": "support_triage", "messages": [{"role": "user", "content": "my camera is offline"}],
                "max_tokens": 4}
        assert post(f"{url}/chat/completions", secrets["endpoint key"], body) == 200
        assert post(f"{url}/chat/completions", None, body) == 401
        records = instance.get_records_for_run(result.run_id).records
        assert records  # the event log was written (and is scanned below, with the run's config)
        events = "\n".join(r.event_log_entry.to_json() for r in records)
        run = instance.get_run_by_id(result.run_id)
        stored_run = json.dumps(run.run_config) + json.dumps(dict(run.tags))
    control.stop_server(home / "endpoint")
    control.stop_server(home / "judge")
    out = capfd.readouterr()
    for name, value in secrets.items():
        assert value not in events, f"{name} in the Dagster event log"
        assert value not in stored_run, f"{name} in the run's config or tags"
        assert value not in out.out + out.err, f"{name} in the output of the run"
    # Every store: MLflow's database and artifacts, the endpoint's request log and server log,
    # the warehouse, the judge's state, Dagster's run and event storage and compute logs.
    assert (home / "mlflow").is_dir() and any((home / "endpoint").rglob("*.log"))
    assert files_holding(tmp_path, secrets) == {}
