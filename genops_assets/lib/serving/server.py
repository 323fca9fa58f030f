"""OpenAI-compatible chat completions over one base model plus LoRA adapters (FastAPI).

Run as ``python -m genops_assets.lib.serving.server``; started and stopped by
``genops_assets.lib.serving.control``. Models served: ``base`` (the base model alone) and one
name per adapter. ``POST /admin/reload`` swaps an adapter in place (bearer token from
``<state_dir>/admin_token``). Every request is appended to ``<state_dir>/requests.jsonl``
(model, tokens, latency, status) for monitoring.

Prompt serving: a request may send ``prompt_variables`` (e.g. ``{"message": "..."}``) instead
of ``messages``; the server renders the deployed prompt version from ``<state_dir>/prompt.json``
(written by the deploy step, re-read when it changes) and records that version.
"""

from __future__ import annotations

import argparse
import json
import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

BASE_NAME = "base"


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model: str
    messages: list[ChatMessage] = Field(default_factory=list)
    # genops extension: variables of the deployed prompt template instead of messages.
    prompt_variables: dict[str, str] | None = None
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
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
           kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def _token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def create_app(loaded, versions: dict[str, str], state_dir: Path, admin_token: str,
               default_max_tokens: int = 256, max_batch: int = 8, batch_wait_s: float = 0.01,
               request_timeout_s: float = 600.0) -> FastAPI:
    from genops_assets.lib.generation import add_adapter
    from genops_assets.lib.serving.batching import Batcher, Job

    app = FastAPI(title="genops endpoint", version="1")
    batcher = Batcher(loaded, max_batch=max_batch, max_wait_s=batch_wait_s)
    app.state.batcher = batcher
    log_lock = threading.Lock()
    started_at = int(time.time())
    requests_log = state_dir / "requests.jsonl"

    prompt_file = state_dir / "prompt.json"
    prompt_cache: dict[str, Any] = {}

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

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        return _error(400, f"invalid request: {'.'.join(loc) or 'body'}: {first.get('msg', 'malformed')}",
                      param=".".join(loc) or None)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "base_model": loaded.base_dir, "adapters": dict(versions),
                "started_at": started_at, "queue_depth": batcher.depth, "batches": batcher.batches,
                "batched_requests": batcher.batched_jobs}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        names = [BASE_NAME, *sorted(loaded.adapters)]
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": started_at, "owned_by": "genops",
             "version": versions.get(n)} for n in names]}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        if req.stream:
            return _error(400, "stream=true is not supported by this endpoint", param="stream",
                          code="unsupported_parameter")
        if req.model != BASE_NAME and req.model not in loaded.adapters:
            return _error(404, f"The model '{req.model}' does not exist (served: "
                          f"{[BASE_NAME, *sorted(loaded.adapters)]})", param="model", code="model_not_found")
        if req.logprobs and not req.guided_choice:
            return _error(400, "logprobs are returned only with guided_choice", param="logprobs",
                          code="unsupported_parameter")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        max_tokens = req.max_completion_tokens or req.max_tokens or default_max_tokens
        adapter = None if req.model == BASE_NAME else req.model
        messages = [m.model_dump() for m in req.messages]
        prompt_version = None
        if req.prompt_variables is not None:
            if messages:
                return _error(400, "send either messages or prompt_variables, not both", param="prompt_variables")
            deployed = deployed_prompt()
            if deployed is None:
                return _error(400, "no prompt is deployed on this endpoint; send messages", param="prompt_variables")
            prompt_version, template = deployed
            try:
                messages = template.render(req.prompt_variables)
            except (KeyError, ValueError) as exc:
                return _error(400, f"prompt v{prompt_version}: {exc}", param="prompt_variables")
            if max_tokens == default_max_tokens and not (req.max_tokens or req.max_completion_tokens):
                max_tokens = template.max_new_tokens
        elif not messages:
            return _error(400, "messages must not be empty", param="messages")
        if req.guided_choice:
            job = Job("choice", messages, adapter, choices=tuple(req.guided_choice))
        else:
            job = Job("generate", messages, adapter, max_new_tokens=max_tokens, temperature=req.temperature,
                      top_p=req.top_p, stop=tuple(stop), seed=req.seed)
        t0 = time.perf_counter()
        try:
            result, timing = batcher.submit(job).result(timeout=request_timeout_s)
        except Exception as exc:  # noqa: BLE001 - reported to the client in OpenAI's shape
            record({"ts": time.time(), "model": req.model, "status": 500, "error": str(exc)[:300]})
            return _error(500, f"generation failed: {exc}", kind="server_error")
        logprobs = None
        if req.guided_choice:
            scores, prompt_tokens = result
            text = max(scores, key=scores.get)
            completion_tokens, finish = 1, "stop"
            if req.logprobs:
                top = sorted(scores.items(), key=lambda kv: -kv[1])[: req.top_logprobs or len(scores)]
                entry = _token_entry(text, scores[text])
                entry["top_logprobs"] = [_token_entry(c, lp) for c, lp in top]
                logprobs = {"content": [entry]}
        else:
            text, prompt_tokens = result.text, result.prompt_tokens
            completion_tokens, finish = result.completion_tokens, result.finish_reason
        latency = time.perf_counter() - t0
        record({"ts": time.time(), "model": req.model, "version": versions.get(req.model), "status": 200,
                "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "latency_s": round(latency, 4), "queue_s": round(timing["queue_s"], 4),
                "batch": timing["batch"], "finish_reason": finish, "guided": bool(req.guided_choice),
                "prompt_version": prompt_version})
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "system_fingerprint": versions.get(req.model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": logprobs, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            **({"genops": {"prompt_version": prompt_version}} if prompt_version else {}),
        }

    @app.post("/admin/reload")
    def reload(req: ReloadRequest, authorization: str | None = Header(None)):
        if not authorization or not secrets.compare_digest(authorization, f"Bearer {admin_token}"):
            return _error(401, "missing or wrong admin token", kind="authentication_error")
        if req.name == BASE_NAME:
            return _error(400, f"'{BASE_NAME}' names the base model and cannot be replaced", param="name")
        try:
            add_adapter(loaded, req.name, req.adapter_dir)
        except (FileNotFoundError, ValueError, OSError) as exc:
            return _error(400, str(exc), param="adapter_dir")
        versions[req.name] = req.version
        record({"ts": time.time(), "event": "reload", "model": req.name, "version": req.version})
        return {"status": "reloaded", "adapters": dict(versions)}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="genops OpenAI-compatible endpoint")
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--adapter", action="append", default=[], help="name=folder")
    parser.add_argument("--version", action="append", default=[], help="name=version")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8008)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    args = parser.parse_args(argv)

    import uvicorn

    from genops_assets.lib.generation import load_model

    state_dir = Path(args.state_dir)
    adapters = dict(a.split("=", 1) for a in args.adapter)
    versions = dict(v.split("=", 1) for v in args.version)
    token = (state_dir / "admin_token").read_text().strip()
    loaded = load_model(args.base_model, adapters, dtype=args.dtype)
    app = create_app(loaded, versions, state_dir, token, max_batch=args.max_batch,
                     batch_wait_s=args.batch_wait_ms / 1000.0)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
