"""OpenAI-compatible chat completions over one base model plus LoRA adapters (FastAPI), for
every task at once.

Models served: ``base`` (the base model alone) and each task's versions by name:
``<task>`` (its champion), ``<task>:challenger``, ``<task>:v<N>`` (a registry version, loaded
on first use when the server follows a registry); see ``routing``. ``POST /admin/reload`` swaps
one task's adapter in place (bearer token from ``<state_dir>/admin_token``) without touching
the others. Every request is appended to ``<state_dir>/requests.jsonl`` (task, model, tokens,
latency, status) for monitoring.

Prompt serving: a request to a task model may send ``prompt_variables`` (e.g.
``{"message": "..."}``) instead of ``messages``; the server renders that task's deployed prompt
version from ``<state_dir>/prompts/<task>.json`` (written by the deploy step, re-read when it
changes). A bare chat request (messages without a system message) gets the deployed prompt too
(``routing.bare_chat``). Responses say which task, served model, adapter version and prompt
version answered: headers ``x-genops-task``, ``x-genops-served-by``, ``x-genops-model-version``,
``x-genops-prompt-version``, and the same in the body's ``genops`` field.

Streaming: ``stream: true`` answers with server-sent ``chat.completion.chunk`` events as the
tokens are decoded (inside the dynamic batch); a client that goes away stops its row.

Guardrails (``serving.guard``, ``lib.guardrails``): every request passes its task's input checks
before it is rendered and queued (a refusal is a 400 with code ``content_filter``), and its
answer passes the output checks before any of it is sent (a refusal is the task's output
refusal text with ``finish_reason: content_filter``); both carry ``genops.guardrail`` and are
counted in ``genops:guardrail_blocks_total``. The request log holds redacted text only.

Protection: bearer API keys on ``/v1/*`` (``GENOPS_API_KEYS``, comma-separated; none: open),
a per-client rate limit, limits on body size, input tokens and ``max_tokens``, a request
timeout. Only the routes below exist; every error has OpenAI's shape. ``GET /metrics`` is in
Prometheus' text format with vLLM's metric names.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException

from genops_assets.lib.guardrails.engine import Guardrails, Verdict
from genops_assets.serving.adapters import LoadedModel, add_adapter, remove_adapter
from genops_assets.serving.batching import Batcher, Job
from genops_assets.serving.generation import GenerationResult
from genops_assets.serving.guard import OutputStream, TaskGuardrails
from genops_assets.serving.llamacpp import ENGINE as LLAMACPP
from genops_assets.serving.llamacpp import LlamaCppError, VariantRoutes, finish_text, render_prompt
from genops_assets.serving.metrics import CONTENT_TYPE, Registry
from genops_assets.serving.protection import (
    ERROR_CLASSES,
    ApiKeys,
    ProtectionMiddleware,
    RateLimiter,
    error_body,
    error_class,
)
from genops_assets.serving.protocol import (
    BASE_NAME,
    ROUTES,
    ChatRequest,
    ModelName,
    ModelNameError,
    ReloadRequest,
    SchemaRequestError,
    VariantRequest,
    choice_logprobs,
    usage,
)
from genops_assets.serving.routing import (
    DeployedPrompts,
    ModelNotFound,
    Route,
    Router,
    bare_chat,
    response_headers,
)
from genops_assets.serving.sampler import sampler_lifespan
from genops_assets.serving.settings import API_KEYS_ENV, ServerSettings
from genops_assets.serving.text_stream import TextStream

log = logging.getLogger("genops.serving")

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                   80.0, 160.0, 320.0, 640.0]
TOKEN_GAP_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]


class EndpointMetrics:
    """The endpoint's Prometheus metrics, with vLLM's names where they mean the same thing."""

    def __init__(self, loaded: LoadedModel, versions: dict[str, str], batcher: Batcher,
                 served_names: Callable[[], list[str]]):
        self.loaded = loaded
        self.served_names = served_names
        self.registry = registry = Registry()
        registry.gauge("vllm:num_requests_running", "Requests whose tokens are being generated (in a batch).",
                       ["model_name"], collect=lambda: self._per_model(batcher.load()[1]))
        registry.gauge("vllm:num_requests_waiting", "Requests queued for the next batch.",
                       ["model_name"], collect=lambda: self._per_model(batcher.load()[0]))
        registry.gauge("genops:loaded_adapters", "LoRA adapters served (1 per adapter and version).",
                       ["adapter", "version"],
                       collect=lambda: {(n, str(versions.get(n, ""))): 1.0 for n in sorted(loaded.adapters)})
        self.ttft = registry.histogram("vllm:time_to_first_token_seconds",
                                       "Time from the request's arrival to its first generated token.",
                                       LATENCY_BUCKETS, ["model_name"])
        self.tpot = registry.histogram("vllm:time_per_output_token_seconds",
                                       "Time between consecutive generated tokens of a request.",
                                       TOKEN_GAP_BUCKETS, ["model_name"])
        self.e2e = registry.histogram("vllm:e2e_request_latency_seconds",
                                      "Time from a request's arrival to its answer.", LATENCY_BUCKETS, ["model_name"])
        self.prompt_total = registry.counter("vllm:prompt_tokens_total", "Prompt tokens processed.", ["model_name"])
        self.generation_total = registry.counter("vllm:generation_tokens_total", "Tokens generated.", ["model_name"])
        self.success_total = registry.counter("vllm:request_success_total", "Requests answered, by finish reason.",
                                              ["model_name", "finished_reason"])
        self.guardrail_blocks = registry.counter("genops:guardrail_blocks_total",
                                                 "Requests refused by a guardrail, by task, stage and check.",
                                                 ["task", "stage", "check"])
        self.guardrail_latency = registry.histogram("genops:guardrail_latency_seconds",
                                                    "Time the guardrail checks of one request took, by stage.",
                                                    TOKEN_GAP_BUCKETS, ["stage"])
        self.errors_total = registry.counter("genops:request_errors_total",
                                             "Requests refused or failed, by error class.", ["class"])
        for cls in sorted({*ERROR_CLASSES.values(), "server"}):
            self.errors_total.inc(0, **{"class": cls})

    def _per_model(self, counts) -> dict[tuple[str, ...], float]:
        return {(n,): float(counts.get(None if n == BASE_NAME else n, 0)) for n in self.served_names()}

    def error(self, status: int) -> None:
        self.errors_total.inc(**{"class": error_class(status)})

    def account(self, model: str, job: Job, t0: float, prompt_tokens: int, completion_tokens: int,
                finish: str | None) -> None:
        """Token counters for work done; latency histograms and the success count when answered."""
        self.prompt_total.inc(prompt_tokens, model_name=model)
        self.generation_total.inc(completion_tokens, model_name=model)
        if finish is None:
            return
        now = time.perf_counter()
        self.success_total.inc(model_name=model, finished_reason=finish)
        self.e2e.observe(now - t0, model_name=model)
        times = list(job.token_times)
        self.ttft.observe((times[0] if times else now) - t0, model_name=model)
        for a, b in itertools.pairwise(times):
            self.tpot.observe(b - a, model_name=model)


class RequestLog:
    """``requests.jsonl``: one JSON line per request answered, refused late or abandoned, and per reload."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def write(self, entry: dict[str, Any]) -> None:
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")


@dataclass
class Prepared:
    """A valid request, ready for the batcher."""

    req: ChatRequest
    job: Job
    request_id: str
    t0: float
    prompt_tokens: int
    stop: list[str]
    entry: dict[str, Any]  # what every request-log record of this request holds
    route: Route
    guard: Guardrails
    system_prompt: str | None  # what the output check guards against leaking
    prompt: Any = None  # llama.cpp routes: the RenderedPrompt sent (the genops tokens' text)
    json_schema: dict[str, Any] | None = None  # the answer must be JSON valid against it (None: free)
    engine_task: asyncio.Task | None = None  # llama.cpp routes: the request to the llama.cpp server

    @property
    def headers(self) -> dict[str, str]:
        return response_headers(self.route.task, self.entry["served_by"], self.entry["version"],
                                self.entry["prompt_version"])


def _context_tokens(loaded: LoadedModel) -> int | None:
    config = getattr(loaded.model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


class ChatService:
    """Chat completions: ``validate`` turns a request into a job (or an OpenAI-shaped refusal),
    ``run`` answers it at once, ``stream`` as server-sent events; a request that will not be
    answered is ``abandon``ed. Every request is counted in the metrics and logged once."""

    def __init__(self, loaded: LoadedModel, settings: ServerSettings, versions: dict[str, str], batcher: Batcher,
                 metrics: EndpointMetrics, request_log: RequestLog, router: Router, state_dir: Path):
        self.loaded, self.settings, self.versions = loaded, settings, versions
        self.batcher, self.metrics, self.request_log, self.router = batcher, metrics, request_log, router
        self.context = settings.context_tokens or _context_tokens(loaded)
        # The batcher thread encodes with loaded.tokenizer; the event loop counts prompt tokens with
        # its own copy, so the two never share a tokenizer (fast tokenizers are not re-entrant).
        self._counting_tokenizer = copy.deepcopy(loaded.tokenizer)
        # Guardrails run on the event loop too, so they count tokens with the same copy.
        self.guards = TaskGuardrails(state_dir, settings.injection_detector, self._count_text_tokens,
                                     enabled=settings.guardrails == "on")
        # The GGUF variants served by llama.cpp (set by create_app; None: none can be).
        self.variants: VariantRoutes | None = None
        # Set by the CLI when it follows a registry: loads a task's version asked by name
        # ("support_triage:v3") as version_loader(task, "3").
        self.version_loader: Callable[[str, str], Any] | None = None

    def fail(self, status: int, message: str, param: str | None = None, code: str | None = None,
             headers: dict[str, str] | None = None) -> JSONResponse:
        self.metrics.error(status)
        return JSONResponse(status_code=status, content=error_body(status, message, param, code), headers=headers)

    def _count_text_tokens(self, text: str) -> int:
        return len(self._counting_tokenizer(text, add_special_tokens=False)["input_ids"])

    def guardrail_blocked(self, guard: Guardrails, verdict: Verdict, task: str | None) -> dict[str, Any]:
        """Count a guardrail's refusal; the ``guardrail`` object of its response and log entry."""
        self.metrics.guardrail_blocks.inc(task=task or BASE_NAME, stage=verdict.stage, check=str(verdict.check))
        return verdict.log_object(guard.version)

    def _check_input(self, guard: Guardrails, task: str | None, model: str, messages: list[dict[str, str]],
                     variables: dict | None) -> tuple[list[dict[str, str]], dict | None, Verdict] | JSONResponse:
        """The client's messages or prompt variables as the input checks leave them (normalised,
        redacted) and the checks' time, or the 400 content_filter refusal (counted and logged)."""
        slots: list[tuple[str, int | None]] = []
        if variables is not None:
            checked = []
            for name, value in variables.items():
                for i, item in enumerate([value] if isinstance(value, str) else value):
                    slots.append((name, None if isinstance(value, str) else i))
                    checked.append({"role": "user", "content": item})
        else:
            checked = messages
        verdict = guard.check_input(checked)
        self.metrics.guardrail_latency.observe(verdict.latency_ms / 1000, stage="input")
        if verdict.check in ("size", "tokens"):
            # The endpoint's own limit answers first when the request breaks it too (as it would
            # with guardrails off): a client sees the same context_length_exceeded error either way.
            tokens = sum(self._count_text_tokens(m["content"]) for m in checked if isinstance(m.get("content"), str))
            if tokens > self.settings.max_input_tokens:
                return self.fail(400, f"The messages have at least {tokens} tokens, over this endpoint's limit of "
                                      f"{self.settings.max_input_tokens} input tokens; shorten them",
                                 param="messages", code="context_length_exceeded")
        if not verdict.allowed:
            guardrail = self.guardrail_blocked(guard, verdict, task)
            stored = guard.stored_messages(checked, checked=False)
            self.request_log.write({
                "ts": time.time(), "request_id": f"chatcmpl-{uuid.uuid4().hex}", "task": task, "model": model,
                "status": 400, "guardrail": guardrail, "guardrails_version": guard.version,
                "guardrail_ms": {"input": round(verdict.latency_ms, 3)},
                **({"prompt_variables": _variables(slots, stored)} if variables is not None else {"messages": stored})})
            self.metrics.error(400)
            body = error_body(400, guard.cfg.refusal.input, param="messages", code="content_filter")
            return JSONResponse(status_code=400, content={**body, "genops": {"guardrail": guardrail}})
        if variables is not None:
            return messages, _variables(slots, verdict.messages), verdict
        return verdict.messages, None, verdict

    def _count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        tok = self._counting_tokenizer
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    async def route(self, name: str) -> Route:
        """The route of model ``name``; a task's registry version asked by name is fetched,
        digest-checked and loaded on first use. ModelNotFound when it cannot be served."""
        asked = self.router.parse(name)
        number = asked.version_number
        if (number is not None and asked.served not in self.loaded.adapters
                and self.version_loader is not None):
            try:
                await asyncio.to_thread(self.version_loader, asked.task, number)
            except Exception as exc:
                log.warning("cannot load %s from the registry: %s", name, exc)
                raise ModelNotFound(f"The model '{name}' does not exist: version {number} of task '{asked.task}' "
                                    f"cannot be loaded from the registry ({str(exc)[:200]}) "
                                    f"(served: {self.router.names()})") from None
            self.unload_old_versions(asked.task, keep=asked.served)
        return self.router.resolve(name)

    def unload_old_versions(self, task: str, keep: str) -> None:
        """Keep at most ``pinned_versions`` registry versions of ``task`` loaded: the oldest
        loaded go (a batch decoding one finishes on it first)."""
        loaded = [n for n in list(self.loaded.adapters)
                  if ModelName.parse(n).task == task and ModelName.parse(n).version_number is not None]
        for name in loaded[: max(0, len(loaded) - self.settings.pinned_versions)]:
            if name == keep:
                continue
            remove_adapter(self.loaded, name)
            version = self.versions.pop(name, None)
            self.request_log.write({"ts": time.time(), "event": "unload", "task": task, "model": name,
                                    "version": version})

    async def validate(self, req: ChatRequest) -> Prepared | JSONResponse:
        t0 = time.perf_counter()
        settings = self.settings
        try:
            route = await self.route(req.model)
        except ModelNotFound as exc:
            return self.fail(404, str(exc), param="model", code="model_not_found")
        if req.n != 1:
            return self.fail(400, f"n must be 1 (got {req.n}): this endpoint returns one choice per request",
                             param="n")
        if req.stream_options is not None and not req.stream:
            return self.fail(400, "stream_options is only allowed with stream=true", param="stream_options")
        if req.logprobs and not req.guided_choice:
            return self.fail(400, "logprobs are returned only with guided_choice", param="logprobs",
                             code="unsupported_parameter")
        if route.engine == LLAMACPP and req.guided_choice:
            return self.fail(400, f"guided_choice is not served by model '{route.served.served}' (a GGUF variant on "
                                  "llama.cpp): ask it for JSON with response_format, or ask a genops-engine model",
                             param="guided_choice", code="unsupported_parameter")
        limit_param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None and asked > settings.max_output_tokens:
            return self.fail(400, f"{limit_param} is {asked}, above this endpoint's limit of "
                                  f"{settings.max_output_tokens}", param=limit_param)
        stop = req.stops
        task, adapter = route.task, route.adapter
        messages = [m.model_dump() for m in req.messages]
        variables, prompt_source, prompt_version = req.prompt_variables, None, None
        max_tokens = asked
        if req.prompt_variables is not None and messages:
            return self.fail(400, "send either messages or prompt_variables, not both", param="prompt_variables")
        if req.prompt_variables is not None and any(v == [] for v in req.prompt_variables.values()):
            return self.fail(400, "a prompt variable's list of passages is empty", param="prompt_variables")
        if req.prompt_variables is None and not messages:
            return self.fail(400, "messages must not be empty", param="messages")
        try:
            guard = self.guards.for_task(task)
        except ValueError as exc:
            return self.fail(500, f"task '{task}': {exc}")
        checked = self._check_input(guard, task, route.asked.served, messages, req.prompt_variables)
        if isinstance(checked, JSONResponse):
            return checked
        messages, variables, input_verdict = checked
        try:
            deployed = self.router.prompts.current(task) if task is not None else None
        except ValueError as exc:
            return self.fail(500, f"task '{task}': {exc}")
        if req.prompt_variables is not None:
            if deployed is None:
                where = f"for task '{task}'" if task is not None else f"for '{BASE_NAME}' (ask a task's model)"
                return self.fail(400, f"no prompt is deployed {where}; send messages", param="prompt_variables")
            prompt_version, template = deployed
            try:
                messages = template.render(variables)
            except (KeyError, ValueError) as exc:
                return self.fail(400, f"task '{task}' prompt v{prompt_version}: {exc}", param="prompt_variables")
            prompt_source = "prompt_variables"
        elif deployed is not None:
            version, template = deployed
            try:
                applied = bare_chat(template, messages)
            except (KeyError, ValueError) as exc:
                return self.fail(400, f"task '{task}' prompt v{version} applied to a bare chat request: {exc}; "
                                      "send prompt_variables, or a system message of your own", param="messages")
            if applied is not None:
                (messages, variables), prompt_version, prompt_source = applied, version, "bare_chat"
        if prompt_source is not None and max_tokens is None:
            max_tokens = min(template.max_new_tokens, settings.max_output_tokens)
        # The log keeps the messages without the canary; the model sees it.
        logged, messages = messages, guard.inject_canary(messages)
        system_prompt = "\n".join(m["content"] for m in logged if m["role"] == "system") or None
        rendered = None
        try:
            if route.engine == LLAMACPP:  # the text llama.cpp reads, and the genops token ids of it
                rendered = render_prompt(self._counting_tokenizer, messages)
                prompt_tokens = len(rendered.tokens)
            else:
                prompt_tokens = self._count_prompt_tokens(messages)
        except (TemplateError, ValueError) as exc:  # the chat template refuses these messages
            return self.fail(400, f"the messages do not fit the model's chat template: {exc}", param="messages")
        if prompt_tokens > settings.max_input_tokens:
            return self.fail(400, f"The messages have {prompt_tokens} tokens, over this endpoint's limit of "
                                  f"{settings.max_input_tokens} input tokens; shorten them", param="messages",
                             code="context_length_exceeded")
        try:  # structured output: asked by the request, else the task's schema when it decodes constrained
            json_schema = req.json_schema(self.router.prompts.output_schema(task) if task is not None else None)
        except SchemaRequestError as exc:
            return self.fail(400, str(exc), param=exc.param)
        except ValueError as exc:
            return self.fail(500, f"task '{task}': {exc}")
        if req.guided_choice:
            job = Job("choice", messages, adapter, choices=tuple(req.guided_choice))
        else:
            context = route.variant.server.n_ctx if route.engine == LLAMACPP else self.context
            room = (context - prompt_tokens) if context else None
            if max_tokens is None:
                default = settings.default_max_tokens
                max_tokens = default if room is None else min(default, room)
                if max_tokens < 1:
                    return self.fail(400, f"The messages have {prompt_tokens} tokens and fill the model's context "
                                          f"of {context} tokens; shorten them", param="messages",
                                     code="context_length_exceeded")
            elif room is not None and max_tokens > room:
                return self.fail(400, f"The model's context is {context} tokens, but {prompt_tokens} input tokens "
                                      f"plus {limit_param}={max_tokens} need {prompt_tokens + max_tokens}; shorten "
                                      f"the messages or lower {limit_param}", param=limit_param,
                                 code="context_length_exceeded")
            job = Job("generate", messages, adapter, max_new_tokens=max_tokens, temperature=req.temperature,
                      top_p=req.top_p, stop=tuple(stop), seed=req.seed, json_schema=json_schema)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        entry = {"request_id": request_id, "task": task, "model": route.asked.served,
                 "served_by": route.served.served, "version": route.version, "engine": route.engine,
                 "prompt_version": prompt_version, "prompt_source": prompt_source,
                 "guided": bool(req.guided_choice), "stream": req.stream,
                 # what was asked, for monitoring, drift and online quality (the redaction hook
                 # scrubs it on its way into the feedback store); a bare chat request records
                 # the prompt variable its last user message filled
                 "prompt_variables": guard.stored_variables(variables), "messages": guard.stored_messages(logged),
                 "guardrails_version": guard.version, "guardrail_ms": {"input": round(input_verdict.latency_ms, 3)},
                 # the input checks changed what the model saw (normalised or redacted)
                 "guardrails_input_changed": input_verdict.changed}
        entry["constrained"] = json_schema is not None
        return Prepared(req, job, request_id, t0, prompt_tokens, stop, entry, route, guard, system_prompt,
                        prompt=rendered, json_schema=json_schema)

    def submit(self, p: Prepared, on_text: Callable[[str], None] | None = None) -> asyncio.Future:
        """Start answering ``p``: the batcher's future (genops engine), or a task asking the
        route's llama.cpp server; either resolves with (result, timing)."""
        if p.route.engine != LLAMACPP:
            return asyncio.wrap_future(self.batcher.submit(p.job))
        p.engine_task = asyncio.ensure_future(self._llamacpp_answer(p, on_text))
        return p.engine_task

    async def _llamacpp_answer(self, p: Prepared, on_text: Callable[[str], None] | None):
        """``p``'s answer from its llama.cpp server: whole (exact token counts), or streamed with
        each piece to ``on_text`` (one piece per token, llama.cpp's stream has no counts). The
        (GenerationResult, timing) of the genops engine; the job's token times and future are
        kept as the batcher keeps them, for the metrics and ``abandon``."""
        job, server = p.job, p.route.variant.server
        job.started = time.perf_counter()
        args = dict(temperature=job.temperature, top_p=job.top_p, stop=job.stop, seed=job.seed,
                    json_schema=p.json_schema, timeout_s=self.settings.request_timeout_s)
        try:
            if on_text is None:
                data = await server.acomplete(p.prompt, job.max_new_tokens, **args)
                choice = data["choices"][0]
                raw, finish = choice.get("text") or "", choice.get("finish_reason")
                generated = int(data["usage"]["completion_tokens"])
                job.token_times.append(time.perf_counter())
            else:
                pieces, finish = [], None
                async for chunk in server.astream(p.prompt, job.max_new_tokens, **args):
                    choice = (chunk.get("choices") or [{}])[0]
                    if choice.get("text"):
                        job.token_times.append(time.perf_counter())
                        pieces.append(choice["text"])
                        on_text(choice["text"])
                    finish = choice.get("finish_reason") or finish
                raw, generated = "".join(pieces), len(pieces)
        except BaseException as exc:
            if not job.future.done():
                job.future.set_exception(exc if isinstance(exc, Exception) else LlamaCppError("cancelled"))
            raise
        text, stopped = finish_text(raw, job.stop)
        result = GenerationResult(text=text, prompt_tokens=p.prompt_tokens, completion_tokens=generated,
                                  latency_s=time.perf_counter() - job.started,
                                  finish_reason="stop" if stopped else (finish or "stop"))
        timing = {"queue_s": job.started - job.enqueued, "batch": 1}
        if not job.future.done():
            job.future.set_result((result, timing))
        return result, timing

    async def run(self, p: Prepared, request: Request) -> dict[str, Any] | JSONResponse:
        """The whole answer at once; 504 past the request timeout, 499 when the client leaves."""
        req, job, t0, timeout_s = p.req, p.job, p.t0, self.settings.request_timeout_s
        future = self.submit(p)
        deadline = t0 + timeout_s
        while not future.done():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                message = f"Request timed out after {timeout_s:g} s"
                future.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody reads it now
                self.abandon(p, 504, message)
                return self.fail(504, message, code="timeout")
            await asyncio.wait({future}, timeout=min(0.5, remaining))
            if not future.done() and await request.is_disconnected():
                future.add_done_callback(lambda f: f.cancelled() or f.exception())
                self.abandon(p, 499, "client disconnected")
                return self.fail(499, "client disconnected", code="client_disconnected")
        try:
            result, timing = future.result()
        except Exception as exc:
            self.request_log.write({"ts": time.time(), **p.entry, "status": 500, "error": str(exc)[:300]})
            return self.fail(500, f"generation failed: {exc}")
        logprobs = None
        if req.guided_choice:
            scores, prompt_tokens = result
            text = max(scores, key=scores.get)
            completion_tokens, finish = 1, "stop"
            if req.logprobs:
                logprobs = choice_logprobs(scores, text, req.top_logprobs)
        else:
            text, prompt_tokens = result.text, result.prompt_tokens
            completion_tokens, finish = result.completion_tokens, result.finish_reason
        verdict = p.guard.check_output(text, p.system_prompt)
        text, guardrail = verdict.text, None
        self.metrics.guardrail_latency.observe(verdict.latency_ms / 1000, stage="output")
        p.entry["guardrail_ms"]["output"] = round(verdict.latency_ms, 3)
        if not verdict.allowed:
            finish, guardrail = "content_filter", self.guardrail_blocked(p.guard, verdict, p.route.task)
        self.answered_by(p)
        self.metrics.account(p.entry["model"], job, t0, prompt_tokens, completion_tokens, finish)
        latency = time.perf_counter() - t0
        self.request_log.write({"ts": time.time(), **p.entry, "status": 200, "prompt_tokens": prompt_tokens,
                                "completion_tokens": completion_tokens, "latency_s": round(latency, 4),
                                "queue_s": round(timing["queue_s"], 4), "batch": timing["batch"],
                                "finish_reason": finish, "response": p.guard.stored_text(text),
                                **({"guardrail": guardrail} if guardrail else {})})
        return JSONResponse({
            "id": p.request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "system_fingerprint": p.entry["version"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": logprobs, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens),
            **_genops_extra(p.entry, guardrail),
        }, headers=p.headers)

    def abandon(self, p: Prepared, status: int, message: str) -> None:
        """Stop a request that will not be answered (timeout, client gone, failure). Its tokens
        are counted and it is logged once its row has really stopped, with what it generated."""
        job = p.job
        if p.engine_task is not None:
            p.engine_task.cancel()
        self.batcher.cancel(job)

        def settled(_future) -> None:
            generated = len(job.token_times)
            self.metrics.account(p.entry["model"], job, p.t0, p.prompt_tokens if job.started else 0, generated, None)
            self.request_log.write({"ts": time.time(), **p.entry, "status": status, "error": message,
                                    "prompt_tokens": p.prompt_tokens, "completion_tokens": generated,
                                    "latency_s": round(time.perf_counter() - p.t0, 4)})

        job.future.add_done_callback(settled)

    async def stream(self, p: Prepared):
        """Server-sent ``chat.completion.chunk`` events as the tokens are decoded."""
        req, job, t0, prompt_tokens = p.req, p.job, p.t0, p.prompt_tokens
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

        text_stream = TextStream(self.loaded.tokenizer, p.stop)
        checked = OutputStream(p.guard, p.system_prompt)  # no unchecked text is sent (see serving.guard)

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

        def chunk(delta: dict[str, Any], finish: str | None = None, logprobs=None, tell: bool = False,
                  guardrail: dict | None = None) -> str:
            body = {"id": p.request_id, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "system_fingerprint": p.entry["version"],
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
            if include_usage:
                body["usage"] = None
            if tell:  # the first chunk (version seen on arrival) and the last (the version that answered)
                body.update(_genops_extra(p.entry, guardrail))
            return event(body)

        if p.route.engine == LLAMACPP:
            def on_text(piece: str) -> None:  # on the event loop, as llama.cpp's chunks arrive
                text_stream.feed_text(piece)
                delta, _ = text_stream.advance()
                if delta:
                    push(("delta", delta))

            def answered(f: asyncio.Future) -> None:
                if not f.cancelled() and f.exception() is None:
                    result = f.result()[0]
                    delta, _ = text_stream.advance(final=True)
                    if delta:
                        push(("delta", delta))
                    push(("end", result.finish_reason, result.completion_tokens))
                push(("done", f))

            self.submit(p, on_text).add_done_callback(answered)
        else:
            if job.kind == "generate":
                job.on_token = on_token
            self.batcher.submit(job).add_done_callback(lambda f: push(("done", f)))
        finished = False
        outcome = (499, "client disconnected")
        timeout_s = self.settings.request_timeout_s
        try:
            yield chunk({"role": "assistant", "content": ""}, tell=True)
            deadline = t0 + timeout_s
            completion_tokens, finish, logprobs = 0, None, None
            answer: list[str] = []
            while finish is None:
                try:
                    item = await asyncio.wait_for(items.get(), timeout=max(0.0, deadline - time.perf_counter()))
                except TimeoutError:
                    outcome = (504, f"Request timed out after {timeout_s:g} s")
                    yield event(error_body(504, outcome[1], code="timeout"))
                    return
                if item[0] == "delta":
                    piece = checked.feed(item[1])
                    if piece:
                        answer.append(piece)
                        yield chunk({"content": piece})
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
                            logprobs = choice_logprobs(scores, text, req.top_logprobs)
                        checked.feed(text)
                        finish, completion_tokens = "stop", 1
                    else:  # the row ended without a last decoding step reaching us: send the rest
                        rest = result.text[len(text_stream.sent):] if result.text.startswith(text_stream.sent) else ""
                        checked.feed(rest)
                        finish, completion_tokens = result.finish_reason, result.completion_tokens
            rest, verdict = checked.finish()
            self.metrics.guardrail_latency.observe(checked.latency_ms / 1000, stage="output")
            p.entry["guardrail_ms"]["output"] = round(checked.latency_ms, 3)
            guardrail = None
            if not verdict.allowed:
                finish, guardrail = "content_filter", self.guardrail_blocked(p.guard, verdict, p.route.task)
                rest = None if answer else verdict.text  # nothing sent yet: the refusal, as without streaming
            if rest:
                answer.append(rest)
                yield chunk({"content": rest}, logprobs=logprobs)
            # Answered: accounted for now, so a client leaving during the last events is no failure.
            finished = True
            self.answered_by(p)  # the log's version; the first chunk said the one seen on arrival
            self.metrics.account(p.entry["model"], job, t0, prompt_tokens, completion_tokens, finish)
            self.request_log.write({"ts": time.time(), **p.entry, "status": 200, "prompt_tokens": prompt_tokens,
                                    "completion_tokens": completion_tokens,
                                    "latency_s": round(time.perf_counter() - t0, 4),
                                    "queue_s": round((job.started or t0) - job.enqueued, 4), "finish_reason": finish,
                                    "response": p.guard.stored_text("".join(answer)),
                                    **({"guardrail": guardrail} if guardrail else {})})
            yield chunk({}, finish=finish, tell=True, guardrail=guardrail)
            if include_usage:
                yield event({"id": p.request_id, "object": "chat.completion.chunk", "created": created,
                             "model": req.model, "system_fingerprint": p.entry["version"], "choices": [],
                             "usage": usage(prompt_tokens, completion_tokens)})
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                status, message = outcome
                self.metrics.error(status)
                self.abandon(p, status, message)

    def swap_adapter(self, name: str, folder: str, version: str) -> None:
        """Load ``folder`` as task model ``name`` (``support_triage``, ``support_triage:challenger``)
        beside the running one, then switch: requests in flight finish on the adapter they started
        with, and other tasks' adapters are not touched. ValueError for a name that is no task model."""
        model = ModelName.parse(name)
        if model.task is None:
            raise ValueError(f"'{BASE_NAME}' names the base model and cannot be replaced")
        add_adapter(self.loaded, model.served, folder, version=version)
        self.versions[model.served] = version
        if self.variants is not None and model.served in self.variants:
            self.variants.remove(model.served)  # the adapter answers again; llama.cpp drains and stops
        self.request_log.write({"ts": time.time(), "event": "reload", "task": model.task, "model": model.served,
                                "version": version, "engine": "local"})

    def swap_variant(self, name: str, variant: dict[str, Any], version: str) -> None:
        """Serve GGUF ``variant`` (a VariantFiles dict) as task model ``name`` on a llama.cpp
        server of its own: it starts and answers before requests go to it, and the server it
        replaces stops once its requests in flight are done. ValueError for a bad name or variant,
        LlamaCppError when llama.cpp cannot serve it."""
        model = ModelName.parse(name)
        if model.task is None:
            raise ValueError(f"'{BASE_NAME}' names the base model and cannot be replaced")
        if self.variants is None:
            raise ValueError("this endpoint serves no llama.cpp variants")
        self.variants.deploy(model.served, variant, version)
        self.versions[model.served] = str(version)
        self.request_log.write({"ts": time.time(), "event": "reload", "task": model.task, "model": model.served,
                                "version": str(version), "engine": LLAMACPP, "variant": variant.get("name")})

    def adapter_version(self, name: str) -> str | None:
        """The version of the task's registered adapter model that ``name`` stands for, which the
        registry watcher compares with the `champion` alias: the adapter's own version, or for a
        llama.cpp variant route the adapter version the variant was made from (its
        ``source_version``). So a variant of the champion keeps serving, and a newly promoted
        adapter replaces it; a variant that names no source is replaced by the champion."""
        route = self.variants.get(name) if self.variants is not None else None
        if route is not None:
            source = route.variant.get("source_version")
            return None if source is None else str(source)
        return self.versions.get(name)

    def answered_by(self, p: Prepared) -> None:
        """Record the version that really answered: a hot swap between accepting the request
        and its batch starting means the new version answered, not the one seen on arrival."""
        label = self.loaded.labels.get(p.job.internal) if p.job.internal is not None else None
        if label is not None and label != p.entry["version"]:
            p.entry["version"] = label

    def served_versions(self, task: str | None = None) -> dict[str, str]:
        """Served model name -> registry version, of one task or all."""
        return {n: v for n, v in list(self.versions.items()) if task is None or ModelName.parse(n).task == task}


def _genops_extra(entry: dict[str, Any], guardrail: dict[str, Any] | None = None) -> dict[str, Any]:
    """The body's ``genops`` field: which task, model, adapter and prompt version answered (task
    models), and the guardrail that refused the answer (any model)."""
    extra = {} if guardrail is None else {"guardrail": guardrail}
    if entry.get("task") is not None:
        extra = {"task": entry["task"], "served_by": entry["served_by"], "model_version": entry["version"],
                 "engine": entry.get("engine", "local"),
                 "prompt_version": entry["prompt_version"], "prompt_source": entry["prompt_source"],
                 "guardrails_version": entry["guardrails_version"],
                 "guardrails_input_changed": entry["guardrails_input_changed"], **extra}
    return {"genops": extra} if extra else {}


def _variables(slots: list[tuple[str, int | None]], messages: list[dict[str, str]]) -> dict[str, Any]:
    """Prompt variables back from the messages their values were checked as (``slots``: the
    variable and list position of each message)."""
    out: dict[str, Any] = {}
    for (name, index), m in zip(slots, messages, strict=True):
        if index is None:
            out[name] = m["content"]
        else:
            out.setdefault(name, []).append(m["content"])
    return out


def create_app(loaded: LoadedModel, settings: ServerSettings, state_dir: Path, admin_token: str,
               versions: dict[str, str] | None = None) -> FastAPI:
    """The endpoint app over ``loaded`` (adapters keyed by served model name, e.g.
    ``support_triage``), serving adapter ``versions`` (served name -> registry version), writing
    its request log and resource samples under ``state_dir``. The settings' canary share of a
    task sends that share of the task's champion requests to its challenger when one is loaded;
    every response and log record says which one answered (``genops.served_by``)."""
    versions = {} if versions is None else versions
    for name, version in versions.items():  # the versions loaded at start label their adapters
        if name in loaded.internal:
            loaded.labels.setdefault(loaded.internal[name], str(version))
    keys = ApiKeys(settings.api_keys)
    if not keys:
        log.warning("%s is not set: /v1/* answers requests without an API key", API_KEYS_ENV)
    limiter = RateLimiter(settings.rate_limit_rpm, settings.rate_limit_burst)
    # GGUF variants served by llama.cpp: the ones deployed before a restart are served again now.
    variants = VariantRoutes(state_dir, n_ctx=settings.llamacpp_n_ctx, n_threads=settings.llamacpp_threads)
    versions.update(variants.restore(skip=list(loaded.adapters)))
    sampling = sampler_lifespan(state_dir, settings.resource_sample_s)

    @contextlib.asynccontextmanager
    async def lifespan(app_: FastAPI):
        try:
            async with sampling(app_):
                yield
        finally:  # no llama.cpp server outlives the endpoint
            await asyncio.to_thread(variants.stop_all)

    app = FastAPI(title="genops endpoint", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    batcher = Batcher(loaded, max_batch=settings.max_batch, max_wait_s=settings.batch_wait_s,
                      scheduler=settings.scheduler)
    router = Router(loaded, versions, settings, DeployedPrompts(state_dir), variants=variants.routes)
    metrics = EndpointMetrics(loaded, versions, batcher, router.names)
    metrics.registry.gauge("genops:llamacpp_servers", "GGUF variants served by a llama.cpp server (1 per model).",
                           ["model_name", "version", "variant"],
                           collect=lambda: {(n, r.version, str(r.variant.get("name"))): 1.0
                                            for n, r in list(variants.routes.items())})
    chat = ChatService(loaded, settings, versions, batcher, metrics, RequestLog(state_dir / "requests.jsonl"),
                       router, state_dir)
    chat.variants = variants
    chat.guards.default.warm_up()  # Presidio and the toxicity model load now, not on the first request
    app.state.batcher, app.state.chat, app.state.swap_adapter = batcher, chat, chat.swap_adapter
    app.state.variants = variants
    started_at = int(time.time())
    fail = chat.fail
    app.add_middleware(ProtectionMiddleware, api_keys=keys, limiter=limiter, max_body_bytes=settings.max_body_bytes,
                       on_error=fail)

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

    def task_summary(task: str) -> dict[str, Any]:
        try:
            deployed = router.prompts.current(task)
        except ValueError as exc:
            deployed = (f"unreadable: {exc}", None)
        try:
            guardrails = chat.guards.for_task(task).version
        except ValueError as exc:
            guardrails = f"unreadable: {exc}"
        return {"versions": chat.served_versions(task), "prompt_version": deployed[0] if deployed else None,
                "guardrails_version": guardrails, "removed": router.removed(task)}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "base_model": loaded.base_dir, "adapters": dict(versions),
                "llamacpp": {n: {"version": r.version, "variant": r.variant.get("name"), "url": r.server.url,
                                 "pid": r.server.pid, "restarts": r.server.restarts}
                             for n, r in list(variants.routes.items())},
                "tasks": {t: task_summary(t) for t in router.tasks()},
                "started_at": started_at, "queue_depth": batcher.depth, "batches": batcher.batches,
                "batched_requests": batcher.batched_jobs}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(metrics.registry.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": m.served, "object": "model", "created": started_at, "owned_by": "genops", "task": m.task,
             "version": versions.get(m.served)} for m in router.models()]}

    @app.post("/v1/chat/completions")
    async def completions(req: ChatRequest, request: Request):
        prepared = await chat.validate(req)
        if isinstance(prepared, JSONResponse):
            return prepared
        if req.stream:
            return StreamingResponse(chat.stream(prepared), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                              **prepared.headers})
        return await chat.run(prepared, request)

    def refused(name: str, authorization: str | None) -> JSONResponse | None:
        """The answer to an admin call without the admin token or naming no model; None: go on."""
        if not authorization or not secrets.compare_digest(authorization.encode(), f"Bearer {admin_token}".encode()):
            return fail(401, "missing or wrong admin token")
        try:
            ModelName.parse(name)
        except ModelNameError as exc:
            return fail(400, str(exc), param="name")
        return None

    @app.post("/admin/reload")
    def reload(req: ReloadRequest, authorization: str | None = Header(None)):
        if (refusal := refused(req.name, authorization)) is not None:
            return refusal
        try:
            chat.swap_adapter(req.name, req.adapter_dir, req.version)
        except (FileNotFoundError, ValueError, OSError) as exc:
            return fail(400, str(exc), param="name" if req.name == BASE_NAME else "adapter_dir")
        return {"status": "reloaded", "adapters": dict(versions)}

    @app.post("/admin/variant")
    def reload_variant(req: VariantRequest, authorization: str | None = Header(None)):
        if (refusal := refused(req.name, authorization)) is not None:
            return refusal
        try:
            chat.swap_variant(req.name, req.variant, req.version)
        except (FileNotFoundError, ValueError, OSError) as exc:
            return fail(400, str(exc), param="variant")
        except LlamaCppError as exc:
            return fail(500, str(exc))
        return {"status": "reloaded", "adapters": dict(versions), "engine": LLAMACPP}

    return app
