"""One endpoint for every task, on the tiny model: three tasks deployed into one server process
through the deploy path (``LocalEndpoint.publish_prompt`` / ``deploy``), each with its own
adapter and prompt, asked through the official openai client. The oracle for each answer is
greedy generation in this process with that task's adapter and rendered prompt."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict

import httpx
import openai
import pytest
from graph_support import free_port
from openai import OpenAI

from genops_assets.lib.prompts import PromptTemplate
from genops_assets.serving.control import EndpointError
from resources.endpoint import LocalEndpoint

pytestmark = pytest.mark.server

# task -> (input field, system prompt, user template, adapter seed of its champion)
TASKS = {
    "triage": ("message", "Triage the support message.", "Message: {message}", 11),
    "extract": ("text", "Extract the expense fields as JSON.", "Receipt: {text}", 12),
    "qa": ("question", "Answer from the manual.", "Question: {question}", 13),
}
QA_CHALLENGER_SEED, QA_NEXT_SEED = 14, 15
INPUT = "my camera is offline since the update"
MAX_NEW = 6


def template(task: str) -> PromptTemplate:
    field, system, user, _ = TASKS[task]
    return PromptTemplate(system, user, field, max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir, tiny_adapters):
    """The endpoint serving triage, extract and qa (qa also with a challenger that answers all
    of its champion's requests: a per-task canary share of 1), and an in-process oracle."""
    from genops_assets.serving.adapters import load_model

    root = tmp_path_factory.mktemp("tasks-endpoint")
    tasks_dir = root / "tasks"
    for task in TASKS:
        (tasks_dir / task).mkdir(parents=True)
    endpoint = LocalEndpoint(state_dir=str(root / "endpoint"), port=free_port(), tasks_dir=str(tasks_dir),
                             canary_shares="qa=1", ready_timeout_s=240)
    actions = []
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GENOPS_API_KEYS", "")  # an open endpoint, whatever the environment holds
        for n, (task, (*_, seed)) in enumerate(TASKS.items(), start=1):
            endpoint.publish_prompt(task, {"name": f"genops-{task}", "version": n,
                                           "template": asdict(template(task))})
            actions.append(endpoint.deploy(str(tiny_model_dir), task, "champion", str(tiny_adapters(seed)), "1"))
        actions.append(endpoint.deploy(str(tiny_model_dir), "qa", "challenger", str(tiny_adapters(QA_CHALLENGER_SEED)),
                                       "2"))
    oracle = load_model(tiny_model_dir, {
        **{task: tiny_adapters(seed) for task, (*_, seed) in TASKS.items()},
        "qa:challenger": tiny_adapters(QA_CHALLENGER_SEED), "qa:next": tiny_adapters(QA_NEXT_SEED)})
    try:
        yield endpoint, tasks_dir, oracle, actions
    finally:
        endpoint.stop()


def expected(oracle, task: str, adapter: str, text: str = INPUT) -> str:
    from genops_assets.serving.generation import generate

    messages = template(task).render({template(task).input_field: text})
    return generate(oracle, [messages], adapter=adapter, max_new_tokens=MAX_NEW)[0].text


def client(endpoint: LocalEndpoint) -> OpenAI:
    return OpenAI(base_url=endpoint.url, api_key="unused", max_retries=0, timeout=120)


def ask(endpoint: LocalEndpoint, model: str, text: str = INPUT, bare: bool = False):
    """The raw response (headers) of a greedy request, with prompt variables or as bare chat."""
    field = TASKS[model.partition(":")[0]][0]
    if bare:
        return client(endpoint).chat.completions.with_raw_response.create(
            model=model, temperature=0, messages=[{"role": "user", "content": text}])
    return client(endpoint).chat.completions.with_raw_response.create(
        model=model, temperature=0, messages=[], extra_body={"prompt_variables": {field: text}})


def test_one_server_answers_every_task_with_its_own_adapter_and_prompt(served, tiny_model_dir, tiny_adapters):
    endpoint, _, oracle, actions = served
    # The first deploy started the server; every later one, of any task, hot-loaded into it.
    assert [a.action for a in actions] == ["started", "reloaded", "reloaded", "reloaded"]
    assert len({a.pid for a in actions}) == 1

    models = {m.id: m for m in client(endpoint).models.list().data}
    assert set(models) == {"base", "triage", "extract", "qa", "qa:challenger"}
    assert models["qa:challenger"].model_extra["task"] == "qa" and models["base"].model_extra["task"] is None
    assert (models["triage"].model_extra["version"], models["qa:challenger"].model_extra["version"]) == ("1", "2")

    answers = {}
    for n, task in enumerate(TASKS, start=1):
        answerer = "qa:challenger" if task == "qa" else task  # qa's canary share is 1
        raw = ask(endpoint, task)
        reply = raw.parse()
        assert raw.headers["x-genops-task"] == task and raw.headers["x-genops-served-by"] == answerer
        assert raw.headers["x-genops-prompt-version"] == str(n)
        assert raw.headers["x-genops-model-version"] == reply.system_fingerprint == ("2" if task == "qa" else "1")
        assert reply.model == task and reply.model_extra["genops"]["task"] == task
        answers[task] = reply.choices[0].message.content
        assert answers[task] == expected(oracle, task, answerer), task
        # A bare chat request gets the task's deployed prompt around its user message: the same answer.
        bare = ask(endpoint, task, bare=True)
        assert bare.parse().choices[0].message.content == answers[task]
        assert bare.headers["x-genops-prompt-version"] == str(n)
    assert len(set(answers.values())) == 3, "each task answers with its own adapter"

    # Asked by version, the champion answers itself: the canary applies to the task's name only.
    assert ask(endpoint, "qa:challenger").headers["x-genops-served-by"] == "qa:challenger"
    # Canary shares are per task: triage's champion (share 0) is never replaced by another model.
    assert {ask(endpoint, "triage").headers["x-genops-served-by"] for _ in range(5)} == {"triage"}

    # One endpoint serves one base model: a task deploying on another is refused, the others untouched.
    with pytest.raises(EndpointError, match=r"serves base model .* for task\(s\) \['extract', 'qa'\]"):
        endpoint.deploy(str(tiny_model_dir) + "-other", "triage", "champion", str(tiny_adapters(11)), "9")
    assert ask(endpoint, "extract").parse().choices[0].message.content == answers["extract"]


@pytest.mark.parametrize("model, says", [
    ("nope", "no task 'nope' is served"),
    ("triage:v9", "task 'triage' has no v9 loaded"),
    ("triage:challenger", "task 'triage' has no challenger loaded"),
    ("triage:latest", "'latest' is not a version of task 'triage'"),
    ("base:challenger", "names the base model"),
    ("", "is not a model name"),
])
def test_a_model_that_is_not_served_gets_an_openai_404(served, model, says):
    endpoint = served[0]
    resp = httpx.post(f"{endpoint.url}/chat/completions", timeout=60,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 404
    error = resp.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "model_not_found", "model")
    assert f"'{model}'" in error["message"] and says in error["message"]
    assert "served: ['base', 'extract', 'qa', 'qa:challenger', 'triage']" in error["message"]
    with pytest.raises(openai.NotFoundError, match="model_not_found"):
        client(endpoint).chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert ask(endpoint, "triage").parse().choices[0].message.content  # nothing else breaks


def test_reloading_one_task_never_disturbs_another(served, tiny_model_dir, tiny_adapters):
    """triage and extract are asked again and again (streamed and whole) while qa's challenger
    is hot-swapped back and forth: their answers and versions never change and none fails;
    qa serves each new version as soon as its deploy returns."""
    endpoint, _, oracle, _ = served
    baseline = {task: expected(oracle, task, task) for task in ("triage", "extract")}
    stop, errors, seen = threading.Event(), [], []

    def traffic(task: str, stream: bool) -> None:
        c = client(endpoint)
        field = TASKS[task][0]
        while not stop.is_set():
            try:
                if stream:
                    parts = list(c.chat.completions.create(model=task, temperature=0, messages=[], stream=True,
                                                           extra_body={"prompt_variables": {field: INPUT}}))
                    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
                    version = parts[0].system_fingerprint
                    assert parts[-1].model_extra["genops"]["model_version"] == version == parts[-1].system_fingerprint
                else:
                    raw = ask(endpoint, task)
                    text, version = raw.parse().choices[0].message.content, raw.headers["x-genops-model-version"]
                seen.append((task, text, version))
            except Exception as exc:
                errors.append(f"{task}: {exc!r}")

    threads = [threading.Thread(target=traffic, args=(task, stream))
               for task in ("triage", "extract") for stream in (False, True)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        for version, seed, adapter in (("3", QA_NEXT_SEED, "qa:next"), ("2", QA_CHALLENGER_SEED, "qa:challenger"),
                                       ("3", QA_NEXT_SEED, "qa:next")):
            outcome = endpoint.deploy(str(tiny_model_dir), "qa", "challenger", str(tiny_adapters(seed)), version)
            assert outcome.action == "reloaded"
            raw = ask(endpoint, "qa")
            assert raw.headers["x-genops-model-version"] == version
            assert raw.parse().choices[0].message.content == expected(oracle, "qa", adapter)
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert errors == []
    assert {task for task, _, _ in seen} == {"triage", "extract"} and len(seen) >= 8
    assert all(text == baseline[task] and version == "1" for task, text, version in seen), \
        [s for s in seen if s[1] != baseline[s[0]] or s[2] != "1"][:3]
    log = [json.loads(x) for x in (endpoint_dir(endpoint) / "requests.jsonl").read_text().splitlines()]
    reloads = [(e["task"], e["model"], e["version"]) for e in log if e.get("event") == "reload"]
    assert reloads[-3:] == [("qa", "qa:challenger", "3"), ("qa", "qa:challenger", "2"), ("qa", "qa:challenger", "3")]


def test_one_tasks_steady_traffic_does_not_starve_another(served):
    """Six clients keep triage's batch busy; an extract request is answered while that traffic
    goes on (a batch decodes one adapter: once the extract request is the oldest waiting, the
    triage batch takes no one new, drains, and extract goes next)."""
    endpoint = served[0]
    stop, triage_done, errors = threading.Event(), [], []

    def traffic(max_tokens: int) -> None:
        c = client(endpoint)
        while not stop.is_set():
            try:
                c.chat.completions.create(model="triage", temperature=0, max_tokens=max_tokens, messages=[],
                                          extra_body={"prompt_variables": {"message": INPUT}})
                triage_done.append(time.monotonic())
            except Exception as exc:
                errors.append(repr(exc))

    # Rows of different lengths end at different steps: the batch never runs empty.
    threads = [threading.Thread(target=traffic, args=(n,)) for n in (5, 9, 14, 22, 31, 40)]
    for t in threads:
        t.start()
    def wait_until(condition) -> None:
        deadline = time.monotonic() + 60
        while not condition() and time.monotonic() < deadline and not errors:
            time.sleep(0.05)

    try:
        wait_until(lambda: len(triage_done) >= 4)
        asked = time.monotonic()
        ask(endpoint, "extract")
        answered = time.monotonic()
        wait_until(lambda: sum(t > answered for t in triage_done) >= 2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert errors == []
    assert any(t < asked for t in triage_done), "triage traffic was flowing before extract asked"
    assert any(t > answered for t in triage_done), "extract was answered while triage traffic went on"


def test_a_request_waiting_through_a_swap_reports_the_version_that_answered(served, tiny_model_dir, tiny_adapters):
    """A request accepted for qa v3 waits while a long triage stream decodes; qa is swapped to
    v2 meanwhile. Its answer comes from v2, and its headers, body and log record say v2."""
    endpoint, _, oracle, _ = served
    endpoint.deploy(str(tiny_model_dir), "qa", "challenger", str(tiny_adapters(QA_NEXT_SEED)), "3")
    long_stream = client(endpoint).chat.completions.create(
        model="triage", temperature=0, max_tokens=1500, stream=True, messages=[], extra_body={
            "prompt_variables": {"message": INPUT}})
    next(iter(long_stream))  # its batch is decoding now
    result = {}
    waiting = threading.Thread(target=lambda: result.update(raw=ask(endpoint, "qa")))
    waiting.start()
    time.sleep(0.5)
    endpoint.deploy(str(tiny_model_dir), "qa", "challenger", str(tiny_adapters(QA_CHALLENGER_SEED)), "2")
    assert waiting.is_alive(), "the qa request was answered before the swap: the triage stream was too short"
    rest = list(long_stream)
    waiting.join(timeout=120)
    raw = result["raw"]
    reply = raw.parse()
    assert reply.choices[0].message.content == expected(oracle, "qa", "qa:challenger")
    assert raw.headers["x-genops-model-version"] == reply.system_fingerprint == "2"
    assert rest and rest[-1].choices[0].finish_reason in ("length", "stop")
    log = [json.loads(x) for x in (endpoint_dir(endpoint) / "requests.jsonl").read_text().splitlines()]
    assert next(e for e in log if e.get("request_id") == reply.id)["version"] == "2"


def endpoint_dir(endpoint: LocalEndpoint):
    from pathlib import Path

    return Path(endpoint.state_dir)


def test_a_removed_task_folder_stops_that_task_only(served):
    endpoint, tasks_dir, _, _ = served
    before = ask(endpoint, "triage").parse().choices[0].message.content
    os.rename(tasks_dir / "extract", tasks_dir / "extract.removed")
    try:
        time.sleep(1.2)  # the server looks at a task's folder at most once a second
        resp = httpx.post(f"{endpoint.url}/chat/completions", timeout=60, json={
            "model": "extract", "messages": [], "prompt_variables": {"text": INPUT}})
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
        assert f"folder of task 'extract' was removed from {tasks_dir}" in resp.json()["error"]["message"]
        assert {m.id for m in client(endpoint).models.list().data} == {"base", "triage", "qa", "qa:challenger"}
        assert ask(endpoint, "triage").parse().choices[0].message.content == before
        health = httpx.get(f"{endpoint.url.removesuffix('/v1')}/health").json()
        assert health["tasks"]["extract"]["removed"] is True and health["tasks"]["triage"]["removed"] is False
    finally:
        os.rename(tasks_dir / "extract.removed", tasks_dir / "extract")
    time.sleep(1.2)
    # The folder is back: the task is served again from what stayed loaded.
    assert ask(endpoint, "extract").headers["x-genops-task"] == "extract"


def test_request_log_records_name_the_task_and_monitoring_reads_one_task(served, tmp_path):
    """The request log's records carry the task; loaded into the feedback store, one task's
    serving metrics count that task's requests (and the base model's, which name no task)."""
    from datetime import UTC, datetime, timedelta

    from genops_assets.lib.feedback import COLUMNS, TASK_ROWS, read_new_records
    from genops_assets.lib.monitoring import serving_report
    from resources.warehouse import FEEDBACK_SCHEMA, DuckDBWarehouse

    endpoint = served[0]
    for task in TASKS:
        ask(endpoint, task)
    client(endpoint).chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    log_path = endpoint_dir(endpoint) / "requests.jsonl"
    records = [json.loads(x) for x in log_path.read_text().splitlines()]
    requests = [r for r in records if r.get("event") != "reload"]
    assert {r["task"] for r in requests} == {"triage", "extract", "qa", None}
    assert all(r["served_by"].partition(":")[0] == r["task"] for r in requests if r["task"] is not None)

    warehouse = DuckDBWarehouse(path=str(tmp_path / "warehouse.duckdb"))
    warehouse.append_feedback(log_path.name, read_new_records(log_path, 0), COLUMNS)
    now = datetime.now(UTC)
    df = warehouse.query_df(f"select * from {FEEDBACK_SCHEMA}.requests where {TASK_ROWS}", ["qa"])
    report = serving_report(df, now - timedelta(hours=1), now + timedelta(minutes=1), now=now)
    assert report.overall.request_count == sum(r["task"] in ("qa", None) for r in requests)
    assert {g.served_by for g in report.groups} == {"qa:challenger", "base"}
