"""The endpoint's wire protocol: OpenAI's chat completions request (with vLLM's and genops'
extensions), the admin reload request, and the served model names with a meaning."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field

BASE_NAME = "base"
"""The served name of the base model alone (every adapter disabled)."""
CHAMPION = "champion"
"""The served name (and registry alias) of the production adapter."""
CHALLENGER = "challenger"
"""The served name of the adapter that answers a share of the champion's requests (canary)."""
VERSION_NAME = re.compile(r"v[0-9]+")
"""A model asked as a registry version (``v3``): fetched and loaded on first use."""
ROUTES = "POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics, POST /admin/reload"


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

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ReloadRequest(BaseModel):
    name: str = Field(min_length=1)
    adapter_dir: str
    version: str


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def choice_logprobs(scores: dict[str, float], text: str, top_logprobs: int | None) -> dict[str, Any]:
    """OpenAI's ``logprobs`` of a guided choice: the chosen answer as one token, the choices as
    its ``top_logprobs``."""
    top = sorted(scores.items(), key=lambda kv: -kv[1])[: top_logprobs or len(scores)]
    entry = _token_entry(text, scores[text])
    entry["top_logprobs"] = [_token_entry(c, lp) for c, lp in top]
    return {"content": [entry]}
