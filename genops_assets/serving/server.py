"""OpenAI-compatible chat completions over one base model plus LoRA adapters (FastAPI).

Run as ``python -m genops_assets.serving.server``; started and stopped by
``genops_assets.serving.control``. Models served: ``base`` (the base model alone) and one
name per adapter. ``POST /admin/reload`` swaps an adapter in place (bearer token from
``<state_dir>/admin_token``). Every request is appended to ``<state_dir>/requests.jsonl``
(model, tokens, latency, status) for monitoring.

Prompt serving: a request may send ``prompt_variables`` (e.g. ``{"message": "..."}``) instead
of ``messages``; the server renders the deployed prompt version from ``<state_dir>/prompt.json``
(written by the deploy step, re-read when it changes) and records that version.

Streaming: ``stream: true`` answers with server-sent ``chat.completion.chunk`` events as the
tokens are decoded (inside the dynamic batch); a client that goes away stops its row.

Protection: bearer API keys on ``/v1/*`` (``GENOPS_API_KEYS``, comma-separated; none: open),
a per-client rate limit, limits on body size, input tokens and ``max_tokens``, a request
timeout. Only the routes below exist; every error has OpenAI's shape. ``GET /metrics`` is in
Prometheus' text format with vLLM's metric names.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import os
import random
import re
import secrets
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from genops_assets.serving.protection import (
    API_KEYS_ENV,
    ERROR_CLASSES,
    ApiKeys,
    ProtectionMiddleware,
    RateLimiter,
    error_body,
    error_class,
    parse_api_keys,
)

BASE_NAME = "base"
CANARY_FROM, CANARY_TO = "champion", "challenger"
VERSION_NAME = re.compile(r"v[0-9]+")
ROUTES = "POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics, POST /admin/reload"

log = logging.getLogger("genops.serving")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model: str
    messages: list[ChatMessage] = Field(default_factory=list)
    # genops extension: variables of the deployed prompt template instead of messages.
    prompt_variables: dict[str, str | list[str]] | None = None  # a list: the passages of {contexts}
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None
    # vLLM's structured-output extension: the answer is one of these strings (judges use it).
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=32)


class ReloadRequest(BaseModel):
    name: str = Field(min_length=1)
    adapter_dir: str
    version: str


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message, param, code), headers=headers)


def _token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


class TextStream:
    """One request's tokens turned into the text deltas of its stream.

    The deltas add up to exactly the text a non-streamed request returns: whitespace at the
    end is held back until more text follows (the answer is stripped), as is any tail that
    could be the start of a stop string; the text ends where a stop string begins. Tokens are
    decoded in a short window (the last emitted tokens as context), and a window ending in a
    partial UTF-8 character waits for the next token."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self._tok = tokenizer
        self.stops = [s for s in stop if s]
        self.tokens: list[int] = []
        self._prefix = 0  # tokens[_prefix:_read] is the context already in ``raw``
        self._read = 0
        self.raw = ""
        self.sent = ""
        self._scanned = 0  # ``raw`` before this index holds no stop string

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def feed(self, token: int) -> None:
        self.tokens.append(token)
        before = self._decode(self.tokens[self._prefix : self._read])
        after = self._decode(self.tokens[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.raw += after[len(before) :]
            self._prefix, self._read = self._read, len(self.tokens)

    def advance(self, final: bool = False) -> tuple[str, bool]:
        """(new text to send, whether a stop string ended the answer). ``final``: the answer is
        complete, so nothing is held back (and the whole answer is decoded at once)."""
        text = self._decode(self.tokens) if final else self.raw
        cut = None
        start = 0 if final else max(0, self._scanned - max((len(s) for s in self.stops), default=0))
        for s in self.stops:
            i = text.find(s, start)
            if i >= 0 and (cut is None or i < cut):
                cut = i
        self._scanned = len(text)
        if cut is not None:
            text = text[:cut]
        elif not final:
            text = text[: len(text) - self._held_tail(text)]
        visible = text.strip()
        delta = visible[len(self.sent) :] if visible.startswith(self.sent) else ""
        self.sent += delta
        return delta, cut is not None

    def _held_tail(self, text: str) -> int:
        """Length of the longest end of ``text`` that a stop string starts with (not all of it)."""
        for k in range(min(len(text), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) and len(s) > k for s in self.stops):
                return k
        return 0


def _context_tokens(loaded) -> int | None:
    config = getattr(loaded.model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


def create_app(loaded, versions: dict[str, str], state_dir: Path, admin_token: str,
               default_max_tokens: int = 256, max_batch: int = 8, batch_wait_s: float = 0.01,
               request_timeout_s: float = 600.0, *, api_keys: Sequence[str] = (), max_input_tokens: int = 4096,
               max_output_tokens: int = 4096, max_body_bytes: int = 1 << 20, rate_limit_rpm: float = 0.0,
               rate_limit_burst: int | None = None, context_tokens: int | None = None,
               canary_share: float = 0.0, scheduler: str = "continuous") -> FastAPI:
    """The endpoint app. ``api_keys``: bearer keys accepted on /v1/* (empty: open, with a
    warning). ``max_input_tokens``: prompt tokens a request may send; ``max_output_tokens``: the
    highest ``max_tokens``; prompt plus ``max_tokens`` must also fit ``context_tokens`` (default:
    the model's ``max_position_embeddings``). ``max_body_bytes``: request body limit (413).
    ``rate_limit_rpm``: requests a minute per API key (per client address without keys), 0 off;
    bursts up to ``rate_limit_burst`` (default: one minute's worth). ``request_timeout_s``: a
    request still unanswered after this is cancelled and answered 504. ``canary_share``: the
    share of `champion` requests answered by `challenger` when one is loaded; every response
    and log record says which one answered (``genops.served_by``). ``scheduler``: how
    generation requests share the model (see ``batching``): "continuous" joins them into the
    running batch between decoding steps, "static" runs one whole batch at a time."""
    from jinja2 import TemplateError

    from genops_assets.serving.generation import add_adapter
    from genops_assets.serving.batching import Batcher, Job
    from genops_assets.serving.metrics import CONTENT_TYPE, Registry
    from genops_assets.serving.sampler import sampler_lifespan

    keys = ApiKeys(api_keys)
    if not keys:
        log.warning("%s is not set: /v1/* answers requests without an API key", API_KEYS_ENV)
    limiter = RateLimiter(rate_limit_rpm, rate_limit_burst)
    context = context_tokens or _context_tokens(loaded)

    app = FastAPI(title="genops endpoint", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=sampler_lifespan(state_dir))  # CPU, memory, GPU samples to resources.jsonl
    batcher = Batcher(loaded, max_batch=max_batch, max_wait_s=batch_wait_s, scheduler=scheduler)
    app.state.batcher = batcher
    log_lock = threading.Lock()
    started_at = int(time.time())
    requests_log = state_dir / "requests.jsonl"
    # The batcher thread encodes with loaded.tokenizer; the event loop counts prompt tokens with
    # its own copy, so the two never share a tokenizer (fast tokenizers are not re-entrant).
    counting_tokenizer = copy.deepcopy(loaded.tokenizer)

    prompt_file = state_dir / "prompt.json"
    prompt_cache: dict[str, Any] = {}

    # Metrics: vLLM's names where they mean the same thing.
    registry = Registry()

    def served_names() -> list[str]:
        return [BASE_NAME, *sorted(loaded.adapters)]

    def per_model(counts) -> dict[tuple[str, ...], float]:
        return {(n,): float(counts.get(None if n == BASE_NAME else n, 0)) for n in served_names()}

    registry.gauge("vllm:num_requests_running", "Requests whose tokens are being generated (in a batch).",
                   ["model_name"], collect=lambda: per_model(batcher.load()[1]))
    registry.gauge("vllm:num_requests_waiting", "Requests queued for the next batch.",
                   ["model_name"], collect=lambda: per_model(batcher.load()[0]))
    registry.gauge("genops:loaded_adapters", "LoRA adapters served (1 per adapter and version).",
                   ["adapter", "version"],
                   collect=lambda: {(n, str(versions.get(n, ""))): 1.0 for n in sorted(loaded.adapters)})
    latency_buckets = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                       40.0, 80.0, 160.0, 320.0, 640.0]
    ttft = registry.histogram("vllm:time_to_first_token_seconds",
                              "Time from the request's arrival to its first generated token.",
                              latency_buckets, ["model_name"])
    tpot = registry.histogram("vllm:time_per_output_token_seconds",
                              "Time between consecutive generated tokens of a request.",
                              [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                               1.0, 2.5], ["model_name"])
    e2e = registry.histogram("vllm:e2e_request_latency_seconds", "Time from a request's arrival to its answer.",
                             latency_buckets, ["model_name"])
    prompt_total = registry.counter("vllm:prompt_tokens_total", "Prompt tokens processed.", ["model_name"])
    generation_total = registry.counter("vllm:generation_tokens_total", "Tokens generated.", ["model_name"])
    success_total = registry.counter("vllm:request_success_total", "Requests answered, by finish reason.",
                                     ["model_name", "finished_reason"])
    errors_total = registry.counter("genops:request_errors_total",
                                    "Requests refused or failed, by error class.", ["class"])
    for cls in sorted({*ERROR_CLASSES.values(), "server"}):
        errors_total.inc(0, **{"class": cls})

    def fail(status: int, message: str, param: str | None = None, code: str | None = None,
             headers: dict[str, str] | None = None) -> JSONResponse:
        errors_total.inc(**{"class": error_class(status)})
        return _error(status, message, param, code, headers)

    app.add_middleware(ProtectionMiddleware, api_keys=keys, limiter=limiter, max_body_bytes=max_body_bytes,
                       on_error=fail)

    def deployed_prompt():
        """(version, template) of the deployed prompt, re-read when the file changes."""
        from genops_assets.lib.prompts import PromptTemplate

        try:
            mtime = prompt_file.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        if prompt_cache.get("mtime") != mtime:
            data = json.loads(prompt_file.read_text(encoding="utf-8"))
            prompt_cache.update(mtime=mtime, version=str(data["version"]), template=PromptTemplate(**data["template"]))
        return prompt_cache["version"], prompt_cache["template"]

    def record(entry: dict[str, Any]) -> None:
        with log_lock, open(requests_log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")

    def count_prompt_tokens(messages: list[dict[str, str]]) -> int:
        text = counting_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(counting_tokenizer(text, add_special_tokens=False)["input_ids"])

    def account(model: str, job, t0: float, prompt_tokens: int, completion_tokens: int,
                finish: str | None) -> None:
        """Token counters for work done; latency histograms and the success count when answered."""
        prompt_total.inc(prompt_tokens, model_name=model)
        generation_total.inc(completion_tokens, model_name=model)
        if finish is None:
            return
        now = time.perf_counter()
        success_total.inc(model_name=model, finished_reason=finish)
        e2e.observe(now - t0, model_name=model)
        times = list(job.token_times)
        ttft.observe((times[0] if times else now) - t0, model_name=model)
        for a, b in zip(times, times[1:]):
            tpot.observe(b - a, model_name=model)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            where = first.get("loc", ("body", None))[-1]
            reason = (first.get("ctx") or {}).get("error", "JSON decode error")
            return fail(400, f"Malformed JSON body: {reason} at character {where}")
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        if not loc and isinstance(first.get("input"), bytes | str):
            return fail(400, "The body must be a JSON object sent with Content-Type: application/json")
        shown = repr(first.get("input"))
        got = f" (got {shown[:80]})" if "input" in first and loc and first.get("type") != "missing" else ""
        return fail(400, f"invalid request: {'.'.join(loc) or 'body'}: {first.get('msg', 'malformed')}{got}",
                    param=".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return fail(404, f"Unknown path {request.url.path}: this endpoint serves {ROUTES}", code="unknown_url")
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            return fail(405, f"Method {request.method} is not allowed on {request.url.path} (allowed: {allowed})",
                        code="method_not_allowed", headers=exc.headers)
        return fail(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception):  # Starlette logs the traceback after this answer
        return fail(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "base_model": loaded.base_dir, "adapters": dict(versions),
                "started_at": started_at, "queue_depth": batcher.depth, "batches": batcher.batches,
                "batched_requests": batcher.batched_jobs}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(registry.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": started_at, "owned_by": "genops",
             "version": versions.get(n)} for n in served_names()]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        t0 = time.perf_counter()
        loader = getattr(app.state, "version_loader", None)
        if req.model not in served_names() and loader is not None and VERSION_NAME.fullmatch(req.model):
            try:  # a registry version asked by name: fetched, digest-checked and loaded once
                await asyncio.to_thread(loader, req.model)
            except Exception as exc:  # noqa: BLE001 - an unknown version is a 404 below
                log.warning("cannot load %s from the registry: %s", req.model, exc)
        if req.model not in served_names():
            return fail(404, f"The model '{req.model}' does not exist (served: {served_names()})", param="model",
                        code="model_not_found")
        if req.n != 1:
            return fail(400, f"n must be 1 (got {req.n}): this endpoint returns one choice per request", param="n")
        if req.stream_options is not None and not req.stream:
            return fail(400, "stream_options is only allowed with stream=true", param="stream_options")
        if req.logprobs and not req.guided_choice:
            return fail(400, "logprobs are returned only with guided_choice", param="logprobs",
                        code="unsupported_parameter")
        limit_param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None and asked > max_output_tokens:
            return fail(400, f"{limit_param} is {asked}, above this endpoint's limit of {max_output_tokens}",
                        param=limit_param)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        served = req.model
        if (req.model == CANARY_FROM and canary_share > 0 and CANARY_TO in loaded.adapters
                and random.random() < canary_share):
            served = CANARY_TO
        adapter = None if served == BASE_NAME else served
        messages = [m.model_dump() for m in req.messages]
        prompt_version = None
        max_tokens = asked
        if req.prompt_variables is not None:
            if messages:
                return fail(400, "send either messages or prompt_variables, not both", param="prompt_variables")
            deployed = deployed_prompt()
            if deployed is None:
                return fail(400, "no prompt is deployed on this endpoint; send messages", param="prompt_variables")
            prompt_version, template = deployed
            try:
                messages = template.render(req.prompt_variables)
            except (KeyError, ValueError) as exc:
                return fail(400, f"prompt v{prompt_version}: {exc}", param="prompt_variables")
            if max_tokens is None:
                max_tokens = min(template.max_new_tokens, max_output_tokens)
        elif not messages:
            return fail(400, "messages must not be empty", param="messages")
        try:
            prompt_tokens = count_prompt_tokens(messages)
        except (TemplateError, ValueError) as exc:  # the chat template refuses these messages
            return fail(400, f"the messages do not fit the model's chat template: {exc}", param="messages")
        if prompt_tokens > max_input_tokens:
            return fail(400, f"The messages have {prompt_tokens} tokens, over this endpoint's limit of "
                             f"{max_input_tokens} input tokens; shorten them", param="messages",
                        code="context_length_exceeded")
        if req.guided_choice:
            job = Job("choice", messages, adapter, choices=tuple(req.guided_choice))
        else:
            room = (context - prompt_tokens) if context else None
            if max_tokens is None:
                max_tokens = default_max_tokens if room is None else min(default_max_tokens, room)
                if max_tokens < 1:
                    return fail(400, f"The messages have {prompt_tokens} tokens and fill the model's context of "
                                     f"{context} tokens; shorten them", param="messages",
                                code="context_length_exceeded")
            elif room is not None and max_tokens > room:
                return fail(400, f"The model's context is {context} tokens, but {prompt_tokens} input tokens plus "
                                 f"{limit_param}={max_tokens} need {prompt_tokens + max_tokens}; shorten the "
                                 f"messages or lower {limit_param}", param=limit_param,
                            code="context_length_exceeded")
            job = Job("generate", messages, adapter, max_new_tokens=max_tokens, temperature=req.temperature,
                      top_p=req.top_p, stop=tuple(stop), seed=req.seed)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        base_entry = {"request_id": request_id, "model": req.model, "served_by": served,
                      "version": versions.get(served),
                      "prompt_version": prompt_version, "guided": bool(req.guided_choice), "stream": req.stream,
                      # what was asked, for monitoring, drift and online quality (the redaction hook
                      # scrubs it on its way into the feedback store)
                      "prompt_variables": req.prompt_variables, "messages": messages}
        if req.stream:
            return StreamingResponse(
                stream_events(req, job, request_id, t0, prompt_tokens, stop, base_entry),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        future = asyncio.wrap_future(batcher.submit(job))
        deadline = t0 + request_timeout_s
        while not future.done():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                message = f"Request timed out after {request_timeout_s:g} s"
                future.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody reads it now
                abandon(job, t0, prompt_tokens, base_entry, 504, message)
                return fail(504, message, code="timeout")
            await asyncio.wait({future}, timeout=min(0.5, remaining))
            if not future.done() and await request.is_disconnected():
                future.add_done_callback(lambda f: f.cancelled() or f.exception())
                abandon(job, t0, prompt_tokens, base_entry, 499, "client disconnected")
                return fail(499, "client disconnected", code="client_disconnected")
        try:
            result, timing = future.result()
        except Exception as exc:  # noqa: BLE001 - reported to the client in OpenAI's shape
            record({"ts": time.time(), **base_entry, "status": 500, "error": str(exc)[:300]})
            return fail(500, f"generation failed: {exc}")
        logprobs = None
        if req.guided_choice:
            scores, prompt_tokens = result
            text = max(scores, key=scores.get)
            completion_tokens, finish = 1, "stop"
            if req.logprobs:
                logprobs = choice_logprobs(req, scores, text)
        else:
            text, prompt_tokens = result.text, result.prompt_tokens
            completion_tokens, finish = result.completion_tokens, result.finish_reason
        account(req.model, job, t0, prompt_tokens, completion_tokens, finish)
        latency = time.perf_counter() - t0
        record({"ts": time.time(), **base_entry, "status": 200, "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens, "latency_s": round(latency, 4),
                "queue_s": round(timing["queue_s"], 4), "batch": timing["batch"], "finish_reason": finish,
                "response": text})
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "system_fingerprint": base_entry["version"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": logprobs, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            **genops_extra(base_entry),
        }

    def genops_extra(entry: dict[str, Any]) -> dict[str, Any]:
        extra = {k: entry[k] for k in ("prompt_version",) if entry.get(k)}
        if entry["served_by"] != entry["model"]:
            extra["served_by"] = entry["served_by"]
        return {"genops": extra} if extra else {}

    def choice_logprobs(req: ChatRequest, scores: dict[str, float], text: str) -> dict[str, Any]:
        top = sorted(scores.items(), key=lambda kv: -kv[1])[: req.top_logprobs or len(scores)]
        entry = _token_entry(text, scores[text])
        entry["top_logprobs"] = [_token_entry(c, lp) for c, lp in top]
        return {"content": [entry]}

    def abandon(job, t0: float, prompt_tokens: int, base_entry: dict[str, Any], status: int,
                message: str) -> None:
        """Stop a request that will not be answered (timeout, client gone, failure). Its tokens
        are counted and it is logged once its row has really stopped, with what it generated."""
        batcher.cancel(job)

        def settled(_future) -> None:
            generated = len(job.token_times)
            account(base_entry["model"], job, t0, prompt_tokens if job.started else 0, generated, None)
            record({"ts": time.time(), **base_entry, "status": status, "error": message,
                    "prompt_tokens": prompt_tokens, "completion_tokens": generated,
                    "latency_s": round(time.perf_counter() - t0, 4)})

        job.future.add_done_callback(settled)

    async def stream_events(req: ChatRequest, job, request_id: str, t0: float, prompt_tokens: int,
                            stop: list[str], base_entry: dict[str, Any]):
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def push(item) -> bool:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
                return False
            return True

        text_stream = TextStream(loaded.tokenizer, stop)

        def on_token(token: int | None, finish: str | None) -> bool:
            # Runs in the batcher thread, inside the decoding step.
            if token is not None:
                text_stream.feed(token)
            delta, stopped = text_stream.advance(final=finish is not None)
            alive = True
            if delta:
                alive = push(("delta", delta))
            if stopped or finish is not None:
                push(("end", "stop" if stopped else finish, len(text_stream.tokens)))
                return True
            return not alive

        def event(body: dict[str, Any]) -> str:
            return f"data: {json.dumps(body)}\n\n"

        def chunk(delta: dict[str, Any], finish: str | None = None, logprobs=None) -> str:
            body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "system_fingerprint": base_entry["version"],
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
            if include_usage:
                body["usage"] = None
            return event(body)

        if job.kind == "generate":
            job.on_token = on_token
        future = batcher.submit(job)
        future.add_done_callback(lambda f: push(("done", f)))
        finished = False
        outcome = (499, "client disconnected")
        try:
            yield chunk({"role": "assistant", "content": ""})
            deadline = t0 + request_timeout_s
            completion_tokens, finish, logprobs = 0, None, None
            answer: list[str] = []
            while finish is None:
                try:
                    item = await asyncio.wait_for(items.get(), timeout=max(0.0, deadline - time.perf_counter()))
                except TimeoutError:
                    outcome = (504, f"Request timed out after {request_timeout_s:g} s")
                    yield event(error_body(504, outcome[1], code="timeout"))
                    return
                if item[0] == "delta":
                    answer.append(item[1])
                    yield chunk({"content": item[1]})
                elif item[0] == "end":
                    finish, completion_tokens = item[1], item[2]
                elif item[0] == "done":
                    done = item[1]
                    if done.cancelled() or done.exception() is not None:
                        reason = "cancelled" if done.cancelled() else f"generation failed: {done.exception()}"
                        outcome = (500, reason)
                        yield event(error_body(500, reason))
                        return
                    result = done.result()[0]
                    if job.kind == "choice":
                        scores, prompt_tokens = result
                        text = max(scores, key=scores.get)
                        if req.logprobs:
                            logprobs = choice_logprobs(req, scores, text)
                        answer.append(text)
                        yield chunk({"content": text}, logprobs=logprobs)
                        finish, completion_tokens = "stop", 1
                    else:  # the row ended without a last decoding step reaching us: send the rest
                        rest = result.text[len(text_stream.sent):] if result.text.startswith(text_stream.sent) else ""
                        if rest:
                            answer.append(rest)
                            yield chunk({"content": rest})
                        finish, completion_tokens = result.finish_reason, result.completion_tokens
            # Answered: accounted for now, so a client leaving during the last events is no failure.
            finished = True
            account(req.model, job, t0, prompt_tokens, completion_tokens, finish)
            record({"ts": time.time(), **base_entry, "status": 200, "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens, "latency_s": round(time.perf_counter() - t0, 4),
                    "queue_s": round((job.started or t0) - job.enqueued, 4), "finish_reason": finish,
                    "response": "".join(answer)})
            yield chunk({}, finish=finish)
            if include_usage:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}
                yield event({"id": request_id, "object": "chat.completion.chunk", "created": created,
                             "model": req.model, "system_fingerprint": base_entry["version"], "choices": [],
                             "usage": usage})
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                status, message = outcome
                errors_total.inc(**{"class": error_class(status)})
                abandon(job, t0, prompt_tokens, base_entry, status, message)

    @app.post("/admin/reload")
    def reload(req: ReloadRequest, authorization: str | None = Header(None)):
        if not authorization or not secrets.compare_digest(authorization.encode(), f"Bearer {admin_token}".encode()):
            return fail(401, "missing or wrong admin token")
        if req.name == BASE_NAME:
            return fail(400, f"'{BASE_NAME}' names the base model and cannot be replaced", param="name")
        try:
            swap_adapter(req.name, req.adapter_dir, req.version)
        except (FileNotFoundError, ValueError, OSError) as exc:
            return fail(400, str(exc), param="adapter_dir")
        return {"status": "reloaded", "adapters": dict(versions)}

    def swap_adapter(name: str, folder: str, version: str) -> None:
        """Load ``folder`` as ``name`` beside the running one, then switch: requests in flight
        finish on the adapter they started with."""
        add_adapter(loaded, name, folder)
        versions[name] = version
        record({"ts": time.time(), "event": "reload", "model": name, "version": version})

    app.state.swap_adapter = swap_adapter

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="genops OpenAI-compatible endpoint "
                                                 f"(API keys: {API_KEYS_ENV}, comma-separated)")
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--adapter", action="append", default=[], help="name=folder")
    parser.add_argument("--version", action="append", default=[], help="name=version")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8008)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--scheduler", choices=("continuous", "static"), default="continuous",
                        help="continuous: requests join the running batch between decoding steps; "
                             "static: one whole batch at a time")
    parser.add_argument("--default-max-tokens", type=int, default=256)
    parser.add_argument("--max-input-tokens", type=int, default=4096)
    parser.add_argument("--max-output-tokens", type=int, default=4096, help="the highest max_tokens accepted")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument("--rate-limit-rpm", type=float, default=0.0,
                        help="requests a minute per API key (per client address without keys); 0: no limit")
    parser.add_argument("--rate-limit-burst", type=int, default=None)
    parser.add_argument("--request-timeout-s", type=float, default=600.0)
    parser.add_argument("--canary-share", type=float, default=0.0,
                        help="share of champion requests answered by challenger (0..1)")
    parser.add_argument("--watch-registry", default=None, help="MLflow tracking URI whose aliases to follow")
    parser.add_argument("--watch-model", default=None, help="registered model name")
    parser.add_argument("--watch-alias", action="append", default=[],
                        help="alias=served name (e.g. champion=champion): hot-swap when the alias moves")
    parser.add_argument("--watch-interval-s", type=float, default=5.0)
    parser.add_argument("--nice", type=int, default=0,
                        help="run at this lower CPU priority (0-19), in an autogroup of its own: for background "
                             "servers (the local judge) beside a production endpoint")
    args = parser.parse_args(argv)
    if not 0.0 <= args.canary_share <= 1.0:
        parser.error("--canary-share must be between 0 and 1")
    if not 0 <= args.nice <= 19:
        parser.error("--nice must be between 0 and 19")
    if args.nice:
        from genops_assets.lib.priority import lower_priority

        lower_priority(args.nice, new_session=True)

    import uvicorn

    from genops_assets.serving.generation import load_model

    api_keys = parse_api_keys(os.environ.get(API_KEYS_ENV))
    state_dir = Path(args.state_dir)
    adapters = dict(a.split("=", 1) for a in args.adapter)
    versions = dict(v.split("=", 1) for v in args.version)
    token = (state_dir / "admin_token").read_text().strip()
    loaded = load_model(args.base_model, adapters, dtype=args.dtype)
    app = create_app(loaded, versions, state_dir, token, default_max_tokens=args.default_max_tokens,
                     max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000.0,
                     request_timeout_s=args.request_timeout_s, api_keys=api_keys,
                     max_input_tokens=args.max_input_tokens, max_output_tokens=args.max_output_tokens,
                     max_body_bytes=args.max_body_bytes, rate_limit_rpm=args.rate_limit_rpm,
                     rate_limit_burst=args.rate_limit_burst, canary_share=args.canary_share,
                     scheduler=args.scheduler)
    watchers = []
    if args.watch_registry and args.watch_model:
        from genops_assets.serving.registry_watch import AliasWatcher, version_loader

        app.state.version_loader = version_loader(args.watch_registry, args.watch_model, state_dir / "registry",
                                                  app.state.swap_adapter)
        for item in args.watch_alias or ["champion=champion"]:
            alias, _, name = item.partition("=")
            watchers.append(AliasWatcher(args.watch_registry, args.watch_model, alias, name or alias,
                                         state_dir / "registry", app.state.swap_adapter,
                                         lambda n=name or alias: versions.get(n), args.watch_interval_s).start())
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        for w in watchers:
            w.stop()


if __name__ == "__main__":
    main()
