"""A scripted stand-in for a remote judge service (an outside boundary): it speaks the
OpenAI chat-completions shape and answers from a script, so retry, garbage and failure
handling can be tested deterministically. Judging itself is tested against genops' real
server elsewhere."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def completion(content: str, probs: dict[str, float] | None = None) -> dict:
    import math

    top = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in (probs or {}).items()]
    lp = {"content": [{"token": content, "logprob": top[0]["logprob"] if top else 0.0,
                       "bytes": list(content.encode()), "top_logprobs": top}]} if top else None
    return {"id": "chatcmpl-standin", "object": "chat.completion", "created": int(time.time()), "model": "judge",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop",
                         "logprobs": lp}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}


class BackgroundServer:
    """A FastAPI app served by uvicorn in a thread of the test process, as a context manager."""

    def serve(self, app: FastAPI, port: int) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}/v1"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=5)


class StandInJudge(BackgroundServer):
    """``script(call_number, body) -> (status, json)`` or ``(status, json, headers)``; requests
    are counted and their arrival times (``time.monotonic``) kept."""

    def __init__(self, script: Callable[[int, dict], tuple], port: int):
        self.calls = 0
        self.bodies: list[dict] = []
        self.arrivals: list[float] = []
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            self.arrivals.append(time.monotonic())
            body = await request.json()
            self.calls += 1
            self.bodies.append(body)
            status, payload, *headers = script(self.calls, body)
            return JSONResponse(payload, status_code=status, headers=headers[0] if headers else None)

        self.serve(app, port)
