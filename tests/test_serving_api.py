"""The endpoint as an OpenAI-compatible API under load and abuse: streaming, API keys, limits,
rate limits, timeouts, client disconnects, concurrency and Prometheus metrics. Each test talks
to a real server process (tiny model) over HTTP, with the official openai client or raw httpx."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from graph_support import free_port
from openai import OpenAI

from genops_assets.serving import control
from genops_assets.serving.metrics import Registry
from genops_assets.serving.protection import ApiKeys, RateLimiter, parse_api_keys

pytestmark = pytest.mark.server

MSG = [{"role": "user", "content": "My doorbell stopped ringing after the update."}]
TASK = "support_triage"  # the served task: its champion is asked by the task's name
KEY = "test-key-alpha"
RL_KEY, TO_KEY = "rate-limited-key", "timeout-key"


def _start(tmp_path_factory, tiny_model_dir, tiny_adapter_dir, name: str, keys: str, extra: list[str]):
    state_dir = tmp_path_factory.mktemp(name) / "endpoint"
    state = control.start_server(str(tiny_model_dir), {TASK: str(tiny_adapter_dir)}, {TASK: "1"},
                                 state_dir, port=free_port(), ready_timeout_s=180, extra_args=extra,
                                 env={"GENOPS_API_KEYS": keys})
    return state, state_dir


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_model_dir, tiny_adapter_dir):
    """Default limits, two API keys."""
    state, state_dir = _start(tmp_path_factory, tiny_model_dir, tiny_adapter_dir, "api", f"{KEY}, other-key", [])
    yield state, state_dir
    control.stop_server(state_dir)


@pytest.fixture(scope="module")
def limited(tmp_path_factory, tiny_model_dir, tiny_adapter_dir):
    """Three requests a minute per key and a one-second request timeout."""
    state, state_dir = _start(tmp_path_factory, tiny_model_dir, tiny_adapter_dir, "limited", f"{RL_KEY},{TO_KEY}",
                              ["--rate-limit-rpm", "3", "--request-timeout-s", "1"])
    yield state, state_dir
    control.stop_server(state_dir)


def _client(url: str, key: str = KEY) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def _auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """/metrics (no API key needed) as {(name, labels): value}; every sample line must parse."""
    resp = httpx.get(f"{url}/metrics", timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    out = {}
    for line in resp.text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        labels = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def total(samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def assert_openai_error(resp: httpx.Response, status: int, needle: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert needle.lower() in body["error"]["message"].lower(), body["error"]["message"]
    return body["error"]


# ---------------------------------------------------------------------------------------------
# Streaming


def test_stream_delivers_the_non_streamed_answer_in_chunks_with_usage(api):
    state, _ = api
    client = _client(state.url)
    whole = client.chat.completions.create(model=TASK, messages=MSG, max_tokens=16, temperature=0)
    assert whole.choices[0].message.content, "the adapter answers with text on the tiny model"

    chunks = list(client.chat.completions.create(model=TASK, messages=MSG, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in text_chunks) == whole.choices[0].message.content
    assert sum(1 for c in text_chunks if c.choices[0].delta.content) > 1, "the answer arrives in pieces"
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.model_dump() == whole.usage.model_dump()

    # Without include_usage no usage chunk is sent; a stop string ends the stream where it begins.
    word = whole.choices[0].message.content.split()[1]
    cut = client.chat.completions.create(model=TASK, messages=MSG, max_tokens=16, temperature=0, stop=[word])
    streamed = list(client.chat.completions.create(model=TASK, messages=MSG, max_tokens=16, temperature=0,
                                                   stop=[word], stream=True))
    assert all(c.choices and c.usage is None for c in streamed)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut.choices[0].message.content
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_stream_sends_tokens_while_they_are_generated(api):
    """The first words arrive long before the last: tokens are not generated first and split after."""
    state, _ = api
    body = {"model": TASK, "messages": MSG, "max_tokens": 300, "temperature": 0, "stream": True}
    arrivals = []
    started = time.perf_counter()
    with httpx.stream("POST", f"{state.url}/v1/chat/completions", json=body, headers=_auth(), timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    arrivals.append(time.perf_counter() - started)
            elif line == "data: [DONE]":
                done_at = time.perf_counter() - started
    assert len(arrivals) > 10
    assert arrivals[0] < 0.5 * done_at, (arrivals[0], done_at)


def test_client_that_disconnects_mid_stream_frees_its_slot(api):
    state, state_dir = api
    before = scrape(state.url)
    body = {"model": TASK, "messages": MSG, "max_tokens": 1500, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{state.url}/v1/chat/completions", json=body, headers=_auth(), timeout=60) as resp:
        lines = resp.iter_lines()  # kept open: dropping the iterator would close the connection
        for line in lines:  # up to the first words: the request is being decoded
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
        running = total(scrape(state.url), "vllm:num_requests_running", model_name=TASK)
        assert running == 1
    # Closed after the first chunk: the row stops, long before 1500 tokens would have been generated.
    deadline = time.monotonic() + 5
    while total(scrape(state.url), "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "the disconnected request still counts as running"
        time.sleep(0.1)
    deadline = time.monotonic() + 5
    while not any(json.loads(line).get("status") == 499 for line in (state_dir / "requests.jsonl").open()):
        assert time.monotonic() < deadline, "the disconnected request was not logged"
        time.sleep(0.1)
    entry = [json.loads(line) for line in (state_dir / "requests.jsonl").open()][-1]
    # Logged once its row stopped, with the tokens really generated: far fewer than asked for.
    assert entry["status"] == 499 and entry["stream"] is True and entry["completion_tokens"] < 500
    after = scrape(state.url)
    cancelled = 'genops:request_errors_total'
    assert total(after, cancelled, **{"class": "cancelled"}) == total(before, cancelled, **{"class": "cancelled"}) + 1
    reply = _client(state.url).chat.completions.create(model=TASK, messages=MSG, max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------------------------------------
# Refusals: status, OpenAI's error shape and a message that says what to change

LONG = [{"role": "user", "content": "word " * 5000}]
CHAT = "/v1/chat/completions"
BAD_INPUTS = [
    # id, server, method, path, headers, body (dict: JSON, bytes: raw), status, message fragment
    ("no_key", "api", "POST", CHAT, {}, {"model": "base", "messages": MSG}, 401, "No API key"),
    ("wrong_key", "api", "POST", CHAT, _auth("guess"), {"model": "base", "messages": MSG}, 401,
     "Incorrect API key"),
    ("wrong_scheme", "api", "GET", "/v1/models", {"Authorization": f"Basic {KEY}"}, None, 401, "API key"),
    ("too_many_input_tokens", "api", "POST", CHAT, _auth(), {"model": "base", "messages": LONG}, 400,
     "limit of 4096 input tokens"),
    ("max_tokens_over_cap", "api", "POST", CHAT, _auth(), {"model": "base", "messages": MSG, "max_tokens": 5000},
     400, "max_tokens is 5000, above this endpoint's limit of 4096"),
    ("over_context", "api", "POST", CHAT, _auth(), {"model": "base", "messages": MSG, "max_tokens": 4000}, 400,
     "context is 2048 tokens"),
    ("n_2", "api", "POST", CHAT, _auth(), {"model": "base", "messages": MSG, "n": 2}, 400, "n must be 1"),
    ("body_too_large", "api", "POST", CHAT, _auth(), b"x" * (2 << 20), 413, "limit of 1048576 bytes"),
    ("malformed_json", "api", "POST", CHAT, _auth(), b'{"model": "base", "messages": [', 400, "Malformed JSON"),
    ("wrong_type", "api", "POST", CHAT, _auth(), {"model": "base", "messages": MSG, "temperature": "hot"}, 400,
     "temperature"),
    ("stream_options_without_stream", "api", "POST", CHAT, _auth(),
     {"model": "base", "messages": MSG, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("unknown_model", "api", "POST", CHAT, _auth(), {"model": "gpt-9", "messages": MSG}, 404, "does not exist"),
    ("unknown_path", "api", "GET", "/v1/engines", _auth(), None, 404, "Unknown path /v1/engines"),
    ("docs_disabled", "api", "GET", "/docs", {}, None, 404, "Unknown path"),
    ("openapi_disabled", "api", "GET", "/openapi.json", {}, None, 404, "Unknown path"),
    ("wrong_method", "api", "GET", CHAT, _auth(), None, 405, "Method GET is not allowed"),
    ("rate_limited", "limited", "GET", "/v1/models", _auth(RL_KEY), None, 429, "Rate limit reached"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_requests_are_refused_in_openai_shape(case, request):
    name, server, method, path, headers, body, status, needle = case
    state, _ = request.getfixturevalue(server)
    kwargs = {"json": body} if isinstance(body, dict) else {"content": body}
    if isinstance(body, bytes):
        headers = {**headers, "Content-Type": "application/json"}
    before = scrape(state.url)
    tries = 4 if name == "rate_limited" else 1  # three a minute pass, the fourth is refused
    for _ in range(tries):
        resp = httpx.request(method, f"{state.url}{path}", headers=headers, timeout=60, **kwargs)
    error = assert_openai_error(resp, status, needle)
    if status == 401:
        assert error["type"] == "authentication_error" and resp.headers["www-authenticate"] == "Bearer"
    if status == 429:
        assert 1 <= int(resp.headers["retry-after"]) <= 60
    if status == 405:
        assert "POST" in resp.headers["allow"]
    if name == "max_tokens_over_cap":
        assert error["param"] == "max_tokens"
    cls = {400: "invalid_request", 401: "authentication", 404: "not_found", 405: "method_not_allowed",
           413: "too_large", 429: "rate_limit"}[status]
    errors = "genops:request_errors_total"
    assert total(scrape(state.url), errors, **{"class": cls}) == total(before, errors, **{"class": cls}) + 1


def test_openai_client_sees_its_usual_exceptions(api):
    state, _ = api
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        _client(state.url, "nope").models.list()
    client = _client(state.url)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=MSG)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model="base", messages=MSG, n=2)
    # The second configured key works too; /health stays open.
    assert {m.id for m in _client(state.url, "other-key").models.list().data} == {"base", TASK}
    assert httpx.get(f"{state.url}/health").json()["status"] == "ok"


def test_request_over_its_time_limit_is_cancelled_with_504(limited):
    state, state_dir = limited
    started = time.monotonic()
    resp = httpx.post(f"{state.url}{CHAT}", headers=_auth(TO_KEY), timeout=60,
                      json={"model": TASK, "messages": MSG, "max_tokens": 1900})
    assert time.monotonic() - started < 10
    error = assert_openai_error(resp, 504, "timed out after 1 s")
    assert error["type"] == "timeout_error"
    deadline = time.monotonic() + 5
    while total(scrape(state.url), "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "the timed-out request still runs"
        time.sleep(0.1)
    assert total(scrape(state.url), "genops:request_errors_total", **{"class": "timeout"}) == 1
    deadline = time.monotonic() + 5
    while not (entries := [json.loads(x) for x in (state_dir / "requests.jsonl").open() if '"status": 504' in x]):
        assert time.monotonic() < deadline, "the timed-out request was not logged"
        time.sleep(0.1)
    assert entries[0]["completion_tokens"] < 1900, "its generation was stopped, not run to the end"


# ---------------------------------------------------------------------------------------------
# Load and metrics


def test_32_concurrent_clients_are_all_answered(api):
    state, _ = api
    before = scrape(state.url)
    health_before = httpx.get(f"{state.url}/health").json()
    barrier = threading.Barrier(32)

    def ask(i: int) -> str:
        client = _client(state.url)
        barrier.wait()
        model = TASK if i % 2 else "base"
        if i % 4 == 3:
            parts = client.chat.completions.create(model=model, messages=MSG, max_tokens=4, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in parts if c.choices) + "|stream"
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"Case {i}"}],
                                               max_tokens=4)
        assert reply.usage.completion_tokens <= 4
        return reply.choices[0].finish_reason

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(ask, range(32)))
    assert len(results) == 32
    after = scrape(state.url)
    answered = total(after, "vllm:request_success_total") - total(before, "vllm:request_success_total")
    assert answered == 32
    assert total(after, "genops:request_errors_total") == total(before, "genops:request_errors_total")
    health = httpx.get(f"{state.url}/health").json()
    batches = health["batches"] - health_before["batches"]
    assert batches < 32, "concurrent requests are batched together"


def test_metrics_are_prometheus_text_and_move_with_traffic(api):
    state, _ = api
    text = httpx.get(f"{state.url}/metrics").text  # no API key needed
    for family, kind in [("vllm:num_requests_running", "gauge"), ("vllm:num_requests_waiting", "gauge"),
                         ("vllm:time_to_first_token_seconds", "histogram"),
                         ("vllm:time_per_output_token_seconds", "histogram"),
                         ("vllm:e2e_request_latency_seconds", "histogram"), ("vllm:prompt_tokens_total", "counter"),
                         ("vllm:generation_tokens_total", "counter"), ("vllm:request_success_total", "counter"),
                         ("genops:request_errors_total", "counter"), ("genops:loaded_adapters", "gauge")]:
        assert f"# TYPE {family} {kind}\n" in text and f"# HELP {family} " in text
    before = scrape(state.url)
    assert before[("genops:loaded_adapters", frozenset({("adapter", TASK), ("version", "1")}))] == 1

    reply = _client(state.url).chat.completions.create(model=TASK, messages=MSG, max_tokens=5)
    with pytest.raises(openai.NotFoundError):
        _client(state.url).chat.completions.create(model="missing", messages=MSG)
    after = scrape(state.url)

    def moved(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("vllm:prompt_tokens_total", model_name=TASK) == reply.usage.prompt_tokens
    assert moved("vllm:generation_tokens_total", model_name=TASK) == reply.usage.completion_tokens
    assert moved("vllm:request_success_total", model_name=TASK,
                 finished_reason=reply.choices[0].finish_reason) == 1
    assert moved("vllm:e2e_request_latency_seconds_count", model_name=TASK) == 1
    assert moved("vllm:time_to_first_token_seconds_count", model_name=TASK) == 1
    assert moved("vllm:time_per_output_token_seconds_count", model_name=TASK) == \
        reply.usage.completion_tokens - 1 + (reply.choices[0].finish_reason == "stop")
    assert moved("genops:request_errors_total", **{"class": "not_found"}) == 1
    # Histogram buckets are cumulative and end at the count.
    buckets = sorted(((float(dict(ls)["le"]), v) for (n, ls), v in after.items()
                      if n == "vllm:e2e_request_latency_seconds_bucket" and ("model_name", TASK) in ls))
    assert [v for _, v in buckets] == sorted(v for _, v in buckets) and math.isinf(buckets[-1][0])
    assert buckets[-1][1] == total(after, "vllm:e2e_request_latency_seconds_count", model_name=TASK)


# ---------------------------------------------------------------------------------------------
# The pieces, in process


def test_registry_writes_the_exposition_format():
    reg = Registry()
    c = reg.counter("x:requests_total", "Requests.\nTwo lines.", ["class"])
    c.inc(**{"class": 'say "hi"\\'})
    h = reg.histogram("x:latency_seconds", "Latency.", [0.1, 1.0])
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    reg.gauge("x:up", "Up.", collect=lambda: {(): 1})
    assert reg.render().splitlines() == [
        "# HELP x:requests_total Requests.\\nTwo lines.", "# TYPE x:requests_total counter",
        'x:requests_total{class="say \\"hi\\"\\\\"} 1.0',
        "# HELP x:latency_seconds Latency.", "# TYPE x:latency_seconds histogram",
        'x:latency_seconds_bucket{le="0.1"} 2.0', 'x:latency_seconds_bucket{le="1.0"} 3.0',
        'x:latency_seconds_bucket{le="+Inf"} 4.0', "x:latency_seconds_sum 3.65", "x:latency_seconds_count 4.0",
        "# HELP x:up Up.", "# TYPE x:up gauge", "x:up 1.0"]
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(model="x")
    with pytest.raises(ValueError, match="cannot decrease"):
        c.inc(-1, **{"class": "a"})


def test_rate_limiter_refills_and_keys_match_exactly():
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=2, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(2)] == [0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(1.0)  # one token a second
    assert limiter.acquire("b") == 0.0  # buckets are per client
    now[0] = 1.0
    assert limiter.acquire("a") == 0.0
    assert not RateLimiter(0).enabled and RateLimiter(0).acquire("a") == 0.0

    keys = ApiKeys(parse_api_keys(" k1 , ,k2,"))
    assert keys.match("Bearer k2") == 1 and keys.match("bearer k1") == 0
    assert keys.match("Bearer k") is None and keys.match("Bearer k1x") is None and keys.match("k1") is None
    assert keys.match("Bearer kü") is None and keys.match(None) is None
    assert not ApiKeys(parse_api_keys(""))


class _PieceTokenizer:
    """Token i decodes to PIECES[i]; enough to drive the stream's text assembly."""

    PIECES = ("  Hel", "lo", " wor", "ld", " \n", "ST", "OP", " more")

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids)


def test_text_stream_holds_back_what_the_final_answer_would_drop():
    from genops_assets.serving.text_stream import TextStream

    stream = TextStream(_PieceTokenizer(), stop=["STOP"])
    deltas = []
    for token in range(len(_PieceTokenizer.PIECES)):
        stream.feed(token)
        delta, stopped = stream.advance()
        deltas.append(delta)
        if stopped:
            break
    # Leading/trailing whitespace and "ST" (maybe the start of "STOP") are never sent; "STOP" ends it.
    assert deltas == ["Hel", "lo", " wor", "ld", "", "", ""] and stopped
    assert "".join(deltas) == "  Hello world \n".strip()

    plain = TextStream(_PieceTokenizer())
    for token in range(4):
        plain.feed(token)
    assert plain.advance() == ("Hello world", False)
    plain.feed(4)
    assert plain.advance() == ("", False)  # whitespace waits for what follows it
    assert plain.advance(final=True) == ("", False)
