"""llama.cpp as a second generation engine, for GGUF variants of a task's model.

``LlamaCppServer`` supervises one ``python -m llama_cpp.server`` process (llama-cpp-python's
OpenAI-compatible server) serving one GGUF file: started on a port of its own with its own log,
health-checked, restarted once when it dies, stopped with its requests drained. ``complete``
asks it for a completion (or a stream of chunks); ``llamacpp_generate`` answers conversations
with the same result type as the genops engine (``serving.generation.generate``), so evaluation,
the optimization report and the serving parity check use either engine through one interface.

Same tokens on both engines: a conversation is rendered by the genops tokenizer's chat template
(``render_prompt``: the text ``kv_cache.encode`` tokenizes), and that text is sent as the
completion prompt. llama-cpp-python's completions route takes text only (its request model has
no token-id prompt), so llama.cpp tokenizes it with its GGUF vocabulary (special tokens parsed);
``complete`` checks that llama.cpp counted exactly the genops token count and refuses an answer
otherwise, and the tests compare the token ids themselves (``tokenize``).

Answers are finished exactly as the genops engine finishes them (``finish_text``: cut at the
first stop string, surrounding whitespace stripped). A JSON schema becomes a llama.cpp grammar
through llama-cpp-python's own converter (``json_schema_grammar``), sent as the request's
``grammar``. Sampling: greedy at temperature 0; otherwise temperature and top-p only (llama.cpp's
own top-k, min-p and repeat penalty are switched off, as the genops engine has none).

``VariantRoutes`` is the endpoint's side: the GGUF variants it serves as task models, one
supervised server each, persisted in ``<state_dir>/llamacpp_routes.json`` so a restarted endpoint
serves them again, swapped without a failed request (new server healthy, route flipped, old one
drained and stopped).

llama-cpp-python is optional (``make install-llamacpp``); it is imported only inside functions.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("genops.serving.llamacpp")

INSTALL_HINT = "llama-cpp-python is not installed in this environment: run `make install-llamacpp`"
ROUTES_FILE = "llamacpp_routes.json"
LOGS_DIR = "llamacpp"
ENGINE = "llamacpp"


class LlamaCppError(RuntimeError):
    """llama.cpp could not be started or refused a request; the message says why (log tail included)."""


def require_llama_cpp() -> None:
    """A clear error naming the make target when llama-cpp-python is missing."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        raise LlamaCppError(f"{INSTALL_HINT} ({exc})") from exc


@functools.lru_cache(maxsize=64)
def _grammar(schema_json: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(schema_json)


def json_schema_grammar(schema: Mapping[str, Any]) -> str:
    """The llama.cpp (GBNF) grammar of ``schema``, by llama-cpp-python's own JSON-schema converter."""
    require_llama_cpp()
    return _grammar(json.dumps(schema, sort_keys=True))


@dataclass(frozen=True)
class RenderedPrompt:
    """A conversation in the model's chat template: the text and the genops token ids of it."""

    text: str
    tokens: tuple[int, ...]


def render_prompt(tokenizer, messages: Sequence[Mapping[str, str]]) -> RenderedPrompt:
    """The conversation as the genops engine sees it (``kv_cache.encode``), ready for the answer."""
    from genops_assets.serving.kv_cache import chat_text, encode_text

    text = chat_text(tokenizer, messages)
    return RenderedPrompt(text, tuple(encode_text(tokenizer, text)))


def finish_text(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """An answer as the genops engine returns it: cut at the first stop string, stripped; and
    whether a stop string cut it."""
    cut = None
    for s in stop:
        i = text.find(s) if s else -1
        if i >= 0 and (cut is None or i < cut):
            cut = i
    return (text if cut is None else text[:cut]).strip(), cut is not None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class LlamaCppServer:
    """One supervised ``python -m llama_cpp.server`` serving ``gguf`` on ``127.0.0.1:<port>``.

    ``new_session``: the process leads a process group of its own (a standalone server);
    False keeps it in the caller's group, so stopping the caller's group (``genops stop``)
    stops it too, even when the caller is killed."""

    def __init__(self, gguf: Path, port: int | None = None, n_ctx: int = 2048, n_threads: int | None = None,
                 log_path: Path | None = None, host: str = "127.0.0.1", new_session: bool = True,
                 restarts: int = 1):
        self.gguf = Path(gguf)
        self.host, self.port, self.n_ctx, self.n_threads = host, port, n_ctx, n_threads
        self.log_path = Path(log_path) if log_path is not None else None
        self.new_session, self.restarts_left = new_session, restarts
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._lock = threading.Lock()
        self._inflight = 0
        self._stopping = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--host", self.host,
               "--port", str(self.port), "--n_ctx", str(self.n_ctx)]
        if self.n_threads:
            cmd += ["--n_threads", str(self.n_threads), "--n_threads_batch", str(self.n_threads)]
        return cmd

    def start(self, timeout_s: float = 120) -> LlamaCppServer:
        """Start the server and wait until it answers; LlamaCppError with its log tail otherwise."""
        require_llama_cpp()
        if not self.gguf.is_file():
            raise LlamaCppError(f"GGUF file {self.gguf} does not exist")
        if self.port is None:
            self.port = free_port(self.host)
        if self.log_path is None:
            import tempfile

            self.log_path = Path(tempfile.mkdtemp(prefix="genops-llamacpp-")) / "server.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._stopping = False
        self._spawn()
        self._wait_ready(timeout_s)
        return self

    def _spawn(self) -> None:
        with open(self.log_path, "ab") as fh:
            fh.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(self.command())}\n".encode())
            fh.flush()
            self.proc = subprocess.Popen(self.command(), stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=self.new_session,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LlamaCppError(f"llama.cpp server for {self.gguf} exited with code {self.proc.returncode} "
                                    f"while starting; log {self.log_path}:\n{_log_tail(self.log_path)}")
            if self.healthy(timeout=1.0):
                log.info("llama.cpp serves %s at %s (pid %s)", self.gguf.name, self.url, self.proc.pid)
                return
            time.sleep(0.2)
        self._terminate()
        raise LlamaCppError(f"llama.cpp server for {self.gguf} not ready after {timeout_s:.0f}s; "
                            f"log {self.log_path}:\n{_log_tail(self.log_path)}")

    def healthy(self, timeout: float = 3.0) -> bool:
        """Whether the process runs and its ``/v1/models`` answers."""
        import httpx

        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            return httpx.get(f"{self.url}/v1/models", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def ensure_running(self, timeout_s: float = 120) -> None:
        """Restart a server that died (at most ``restarts`` times over its life); LlamaCppError
        with the log tail when it is dead for good."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                return
            if self._stopping:
                raise LlamaCppError(f"llama.cpp server for {self.gguf} was stopped")
            code = None if self.proc is None else self.proc.returncode
            if self.restarts_left <= 0:
                raise LlamaCppError(f"llama.cpp server for {self.gguf} died (exit code {code}); log "
                                    f"{self.log_path}:\n{_log_tail(self.log_path)}")
            self.restarts_left -= 1
            self.restarts += 1
            log.warning("llama.cpp server for %s died (exit code %s): restarting", self.gguf, code)
            self._spawn()
            self._wait_ready(timeout_s)

    def stop(self, drain_s: float = 0.0) -> None:
        """Stop the server; with ``drain_s`` its requests in flight may finish first (that long at most)."""
        self._stopping = True
        deadline = time.monotonic() + drain_s
        while self._inflight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        self._terminate()

    def _terminate(self, grace_s: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=5)

    def __enter__(self) -> LlamaCppServer:
        return self.start() if self.proc is None or self.proc.poll() is not None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- requests --------------------------------------------------------------------------

    def request_body(self, prompt: RenderedPrompt | str, max_tokens: int, temperature: float = 0.0,
                     top_p: float = 1.0, stop: Sequence[str] | None = None, seed: int | None = None,
                     json_schema: Mapping[str, Any] | None = None, stream: bool = False) -> dict[str, Any]:
        """The ``/v1/completions`` body (llama-cpp-python's CreateCompletionRequest)."""
        body: dict[str, Any] = {
            "prompt": prompt.text if isinstance(prompt, RenderedPrompt) else prompt,
            "max_tokens": int(max_tokens), "temperature": float(temperature), "stream": stream,
            # the genops engine samples with temperature and top-p only
            "top_p": float(top_p) if temperature > 0 else 1.0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0,
        }
        if stop:
            body["stop"] = [s for s in stop if s]
        if seed is not None:
            body["seed"] = int(seed)
        if json_schema is not None:
            body["grammar"] = json_schema_grammar(json_schema)
        return body

    def _check_tokens(self, prompt: RenderedPrompt | str, data: Mapping[str, Any]) -> None:
        counted = (data.get("usage") or {}).get("prompt_tokens")
        if isinstance(prompt, RenderedPrompt) and counted is not None and counted != len(prompt.tokens):
            raise LlamaCppError(f"llama.cpp read {counted} prompt tokens where the genops tokenizer has "
                                f"{len(prompt.tokens)}: {self.gguf} does not share the served model's tokenizer")

    def complete(self, prompt: RenderedPrompt | str, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] | None = None, seed: int | None = None,
                 json_schema: Mapping[str, Any] | None = None, stream: bool = False,
                 timeout_s: float = 600.0) -> dict | Iterator[dict]:
        """POST ``/v1/completions``: the response, or (``stream``) an iterator of its chunks."""
        body = self.request_body(prompt, max_tokens, temperature, top_p, stop, seed, json_schema, stream)
        if stream:
            return self._stream_sync(body, timeout_s)
        import httpx

        self.ensure_running()
        with self._counted():
            try:
                resp = httpx.post(f"{self.url}/v1/completions", json=body, timeout=timeout_s)
            except httpx.HTTPError as exc:
                raise self._failure(exc) from exc
        return self._completion(prompt, resp)

    def _stream_sync(self, body: dict, timeout_s: float) -> Iterator[dict]:
        import httpx

        self.ensure_running()
        with self._counted(), httpx.stream("POST", f"{self.url}/v1/completions", json=body,
                                           timeout=timeout_s) as resp:
            if resp.status_code != 200:
                raise LlamaCppError(f"llama.cpp at {self.url} answered {resp.status_code}: "
                                    f"{resp.read().decode(errors='replace')[:500]}")
            for line in resp.iter_lines():
                chunk = _sse_data(line)
                if chunk is not None:
                    yield chunk

    async def acomplete(self, prompt: RenderedPrompt | str, max_tokens: int, temperature: float = 0.0,
                        top_p: float = 1.0, stop: Sequence[str] | None = None, seed: int | None = None,
                        json_schema: Mapping[str, Any] | None = None, timeout_s: float = 600.0) -> dict:
        """A whole completion (with llama.cpp's exact token counts), for an event loop (the endpoint)."""
        import asyncio

        import httpx

        body = self.request_body(prompt, max_tokens, temperature, top_p, stop, seed, json_schema)
        if self.proc is None or self.proc.poll() is not None:
            await asyncio.to_thread(self.ensure_running)
        with self._counted():
            try:
                async with httpx.AsyncClient(timeout=timeout_s) as client:
                    resp = await client.post(f"{self.url}/v1/completions", json=body)
            except httpx.HTTPError as exc:
                raise self._failure(exc) from exc
        return self._completion(prompt, resp)

    async def astream(self, prompt: RenderedPrompt | str, max_tokens: int, temperature: float = 0.0,
                      top_p: float = 1.0, stop: Sequence[str] | None = None, seed: int | None = None,
                      json_schema: Mapping[str, Any] | None = None,
                      timeout_s: float = 600.0) -> AsyncIterator[dict]:
        """The chunks of a streamed completion, for an event loop (the endpoint)."""
        import asyncio

        import httpx

        body = self.request_body(prompt, max_tokens, temperature, top_p, stop, seed, json_schema, stream=True)
        if self.proc is None or self.proc.poll() is not None:
            await asyncio.to_thread(self.ensure_running)
        with self._counted():
            try:
                async with (httpx.AsyncClient(timeout=timeout_s) as client,
                            client.stream("POST", f"{self.url}/v1/completions", json=body) as resp):
                    if resp.status_code != 200:
                        text = (await resp.aread()).decode(errors="replace")
                        raise LlamaCppError(f"llama.cpp at {self.url} answered {resp.status_code}: {text[:500]}")
                    async for line in resp.aiter_lines():
                        chunk = _sse_data(line)
                        if chunk is not None:
                            yield chunk
            except httpx.HTTPError as exc:
                raise self._failure(exc) from exc

    def _completion(self, prompt: RenderedPrompt | str, resp) -> dict:
        """The completion of a finished (non-streamed) response, its token count checked."""
        if resp.status_code != 200:
            raise LlamaCppError(f"llama.cpp at {self.url} answered {resp.status_code}: {resp.text[:500]}")
        data = resp.json()
        self._check_tokens(prompt, data)
        return data

    @contextlib.contextmanager
    def _counted(self):
        with self._lock:
            self._inflight += 1
        try:
            yield
        finally:
            with self._lock:
                self._inflight -= 1

    def _failure(self, exc: Exception) -> LlamaCppError:
        state = "running" if self.proc is not None and self.proc.poll() is None else "dead"
        return LlamaCppError(f"llama.cpp at {self.url} ({state}) failed: {exc}; log {self.log_path}:\n"
                             f"{_log_tail(self.log_path, 10)}")

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own token ids of ``text`` (special tokens parsed, as a completion prompt is)."""
        import httpx

        resp = httpx.post(f"{self.url}/extras/tokenize", json={"input": text}, timeout=60)
        if resp.status_code != 200:
            raise LlamaCppError(f"llama.cpp at {self.url} /extras/tokenize answered {resp.status_code}: "
                                f"{resp.text[:300]}")
        return list(resp.json()["tokens"])


def _sse_data(line: str) -> dict | None:
    if not line.startswith("data:"):
        return None
    payload = line[len("data:"):].strip()
    if not payload or payload == "[DONE]":
        return None
    data = json.loads(payload)
    if "error" in data and "choices" not in data:
        raise LlamaCppError(f"llama.cpp stream error: {data['error']}")
    return data


def llamacpp_generate(server: LlamaCppServer, tokenizer, messages_batch: Sequence[Sequence[Mapping[str, str]]],
                      max_new_tokens: int, temperature: float = 0.0, json_schema: Mapping[str, Any] | None = None,
                      stop: Sequence[str] | None = None, top_p: float = 1.0, seed: int | None = None):
    """Answer each conversation on ``server``, rendered by ``tokenizer`` (the genops tokenizer):
    the same ``GenerationResult``s as ``serving.generation.generate``, one request at a time
    (llama-cpp-python's server decodes one sequence at a time)."""
    from genops_assets.serving.generation import GenerationResult

    results = []
    for messages in messages_batch:
        prompt = render_prompt(tokenizer, messages)
        started = time.perf_counter()
        data = server.complete(prompt, max_new_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed,
                               json_schema=json_schema)
        choice = data["choices"][0]
        text, stopped = finish_text(choice.get("text") or "", stop or ())
        finish = "stop" if stopped else (choice.get("finish_reason") or "stop")
        results.append(GenerationResult(text=text, prompt_tokens=len(prompt.tokens),
                                        completion_tokens=int(data["usage"]["completion_tokens"]),
                                        latency_s=time.perf_counter() - started, finish_reason=finish))
    return results


# -- the endpoint's variant routes ----------------------------------------------------------

def variant_gguf(variant: Mapping[str, Any]) -> Path:
    """The .gguf file of a variant (a VariantFiles dict), after checking its folder against its
    manifest (``lib.integrity``); ValueError naming what is wrong."""
    from genops_assets.lib.integrity import verify_folder

    for key in ("name", "path", "format", "engine"):
        if key not in variant:
            raise ValueError(f"variant {dict(variant)!r} lacks '{key}'")
    if variant["engine"] != ENGINE or variant["format"] != "gguf":
        raise ValueError(f"variant '{variant['name']}' is {variant['format']} for engine '{variant['engine']}': "
                         f"only gguf variants for engine '{ENGINE}' are served by llama.cpp")
    folder = Path(variant["path"])
    verify_folder(folder)
    from genops_assets.lib.variants import gguf_file

    return gguf_file(folder)


@dataclass
class VariantRoute:
    """A served model answered by llama.cpp: the server, its registry version and its variant."""

    name: str
    version: str
    variant: dict[str, Any]
    server: LlamaCppServer

    @property
    def engine(self) -> str:
        return ENGINE


class VariantRoutes:
    """The GGUF variants an endpoint serves (served model name -> VariantRoute), persisted in
    ``<state_dir>/llamacpp_routes.json``; each server logs to ``<state_dir>/llamacpp/``."""

    def __init__(self, state_dir: Path, n_ctx: int = 2048, n_threads: int | None = None,
                 start_timeout_s: float = 120.0, drain_s: float = 60.0):
        self.state_dir = Path(state_dir)
        self.n_ctx, self.n_threads, self.start_timeout_s, self.drain_s = n_ctx, n_threads, start_timeout_s, drain_s
        self.routes: dict[str, VariantRoute] = {}
        self._lock = threading.Lock()
        self._stoppers: list[threading.Thread] = []

    @property
    def path(self) -> Path:
        return self.state_dir / ROUTES_FILE

    def __contains__(self, name: str) -> bool:
        return name in self.routes

    def get(self, name: str) -> VariantRoute | None:
        return self.routes.get(name)

    def names(self) -> list[str]:
        return list(self.routes)

    def _start(self, name: str, variant: Mapping[str, Any]) -> LlamaCppServer:
        gguf = variant_gguf(variant)
        safe = name.replace(":", "-")
        server = LlamaCppServer(gguf, n_ctx=self.n_ctx, n_threads=self.n_threads,
                                log_path=self.state_dir / LOGS_DIR / f"{safe}.log", new_session=False)
        return server.start(self.start_timeout_s)

    def deploy(self, name: str, variant: Mapping[str, Any], version: str) -> VariantRoute:
        """Serve ``variant`` as ``name``: a new server starts and answers before the route flips
        to it; the old one (if any) stops once its requests in flight are done."""
        server = self._start(name, variant)
        route = VariantRoute(name, str(version), dict(variant), server)
        with self._lock:
            old = self.routes.get(name)
            self.routes[name] = route
            self._save()
        if old is not None:
            self._retire(old)
        return route

    def remove(self, name: str) -> None:
        """Stop serving ``name`` from llama.cpp (its requests in flight finish first)."""
        with self._lock:
            old = self.routes.pop(name, None)
            self._save()
        if old is not None:
            self._retire(old)

    def _retire(self, route: VariantRoute) -> None:
        thread = threading.Thread(target=route.server.stop, kwargs={"drain_s": self.drain_s},
                                  name=f"llamacpp-retire-{route.name}", daemon=True)
        thread.start()
        self._stoppers.append(thread)

    def _save(self) -> None:
        from genops_assets.lib.hashing import atomic_write_json

        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {n: {"version": r.version, "variant": r.variant} for n, r in self.routes.items()})

    def restore(self, skip: Sequence[str] = ()) -> dict[str, str]:
        """Serve again what the file records (an endpoint restart), but for the names in ``skip``
        (adapters the endpoint was started with win); served name -> version."""
        if not self.path.is_file():
            return {}
        try:
            recorded = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LlamaCppError(f"{self.path}: unreadable ({exc})") from exc
        for name, item in recorded.items():
            if name in skip:
                continue
            try:
                route = VariantRoute(name, str(item["version"]), dict(item["variant"]),
                                     self._start(name, item["variant"]))
            except (KeyError, TypeError) as exc:
                raise LlamaCppError(f"{self.path}: entry '{name}' is malformed ({exc})") from exc
            self.routes[name] = route
        self._save()
        return {n: r.version for n, r in self.routes.items()}

    def stop_all(self) -> None:
        """Stop every server (endpoint shutdown): the file keeps what to serve at the next start."""
        for route in list(self.routes.values()):
            route.server.stop(drain_s=5.0)
        for thread in self._stoppers:
            thread.join(timeout=self.drain_s + 15)
