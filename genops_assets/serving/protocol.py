"""The endpoint's wire protocol: OpenAI's chat completions request (with vLLM's and genops'
extensions), the admin reload request, and the served model names.

One server serves every task. A model name is ``base`` (the base model alone) or names a task
and one of its versions: ``<task>`` (its champion; ``<task>:champion`` says the same),
``<task>:challenger``, or ``<task>:v<N>`` (registered version N of the task's model). A task's
tuned judge is ``<task>:judge`` (its certified judge adapter) or ``<task>:judge-v<N>`` (version N
of the task's judge model, served while it is being certified)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

BASE_NAME = "base"
"""The served name of the base model alone (every adapter disabled)."""
CHAMPION = "champion"
"""The served name (and registry alias) of the production adapter."""
CHALLENGER = "challenger"
"""The served name of the adapter that answers a share of the champion's requests (canary)."""
ROLES = (CHAMPION, CHALLENGER)
"""The versions of a task that the deploy step and the registry aliases name."""
VERSION_NAME = re.compile(r"v[1-9][0-9]*")
"""A task version asked as a registry version (``<task>:v3``): fetched and loaded on first use."""
JUDGE = "judge"
"""The served name (``<task>:judge``) of a task's certified judge adapter on the local judge server."""
JUDGE_VERSION = re.compile(r"judge-v[1-9][0-9]*")
"""A version of a task's judge model served by number (``<task>:judge-v2``), e.g. while it is certified."""
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
"""A task's name as a model name uses it (its folder name under ``tasks/``)."""
SEPARATOR = ":"


class ModelNameError(ValueError):
    """A model name that cannot name a task version; the message says why."""


@dataclass(frozen=True)
class ModelName:
    """A served model: ``task`` None is the base model; ``slot`` is ``champion``,
    ``challenger``, ``v<N>``, ``judge`` or ``judge-v<N>`` (``base`` for the base model)."""

    task: str | None
    slot: str

    @property
    def served(self) -> str:
        """The canonical name: ``base``, ``<task>``, ``<task>:challenger``, ``<task>:v<N>``, ``<task>:judge``..."""
        if self.task is None:
            return BASE_NAME
        return self.task if self.slot == CHAMPION else f"{self.task}{SEPARATOR}{self.slot}"

    @property
    def version_number(self) -> str | None:
        """N of a ``v<N>`` slot."""
        return self.slot[1:] if VERSION_NAME.fullmatch(self.slot) else None

    @classmethod
    def parse(cls, name: str) -> ModelName:
        """The model a request or a reload names; ModelNameError says what is wrong."""
        if name == BASE_NAME:
            return cls(None, BASE_NAME)
        task, sep, slot = name.partition(SEPARATOR)
        if not TASK_NAME.fullmatch(task):
            raise ModelNameError(f"'{name}' is not a model name: use '{BASE_NAME}', '<task>', "
                                 f"'<task>{SEPARATOR}{CHALLENGER}', '<task>{SEPARATOR}v<N>' or "
                                 f"'<task>{SEPARATOR}{JUDGE}'")
        if task == BASE_NAME:
            raise ModelNameError(f"'{BASE_NAME}' names the base model, not a task")
        if not sep:
            return cls(task, CHAMPION)
        if slot not in (*ROLES, JUDGE) and not VERSION_NAME.fullmatch(slot) and not JUDGE_VERSION.fullmatch(slot):
            raise ModelNameError(f"'{name}': '{slot}' is not a version of task '{task}' (use {CHAMPION}, "
                                 f"{CHALLENGER}, v<N>, {JUDGE} or {JUDGE}-v<N>)")
        return cls(task, slot)

    @classmethod
    def of(cls, task: str, slot: str) -> ModelName:
        """The model of ``task``'s ``slot`` (a role or ``v<N>``), checked like a parsed name."""
        return cls.parse(f"{task}{SEPARATOR}{slot}")


def served_name(task: str, slot: str) -> str:
    """The name clients ask for ``task``'s ``slot``: ``support_triage``, ``support_triage:challenger``."""
    return ModelName.of(task, slot).served


def judge_name(task: str, version: str | int | None = None) -> str:
    """The name clients ask for ``task``'s tuned judge: ``<task>:judge`` (its certified adapter),
    or ``<task>:judge-v<N>`` (version N of its judge model)."""
    return ModelName.of(task, JUDGE if version is None else f"{JUDGE}-v{version}").served


ROUTES = ("POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics, POST /admin/reload, "
          "POST /admin/variant")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``: a named schema the answer must follow."""

    model_config = ConfigDict(populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON that a schema accepts."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SchemaRequestError(ValueError):
    """A structured-output request that cannot be served; ``param`` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


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
    # Structured output: OpenAI's response_format, or vLLM's guided_json (a schema, or its JSON text).
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=32)

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def json_schema(self, task_schema: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The JSON schema the answer must follow (None: free text), checked by llguidance.

        ``response_format`` or ``guided_json`` choose it; ``json_object`` is any JSON object. A
        request that sets neither gets ``task_schema`` (a task whose answers are held to its
        output schema); ``{"type": "text"}`` asks for free text explicitly. SchemaRequestError
        names the field that is wrong."""
        from genops_assets.lib.constrained import ANY_JSON_OBJECT, SchemaError, check_schema

        fmt, guided = self.response_format, self.guided_json
        if fmt is not None and fmt.type != "text" and guided is not None:
            raise SchemaRequestError("send either response_format or guided_json, not both", "guided_json")
        if self.guided_choice and (guided is not None or (fmt is not None and fmt.type != "text")):
            raise SchemaRequestError("guided_choice cannot be combined with a JSON response format",
                                     "response_format" if guided is None else "guided_json")
        if guided is not None:
            schema, where = guided, "guided_json"
            if isinstance(guided, str):
                try:
                    schema = json.loads(guided)
                except ValueError as exc:
                    raise SchemaRequestError(f"guided_json: not valid JSON: {exc}", where) from None
        elif fmt is None:
            return None if self.guided_choice else task_schema
        elif fmt.type == "text":
            return None
        elif fmt.type == "json_object":
            return dict(ANY_JSON_OBJECT)
        else:
            where = "response_format.json_schema.schema"
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise SchemaRequestError(f"{where} is required with response_format type 'json_schema'", where)
            schema = fmt.json_schema.schema_
        try:
            check_schema(schema, where)
        except SchemaError as exc:
            raise SchemaRequestError(str(exc), where) from None
        return schema


class ReloadRequest(BaseModel):
    name: str = Field(min_length=1, description="The served model name: '<task>', '<task>:challenger', "
                                                "'<task>:v<N>'")
    adapter_dir: str
    version: str


class VariantRequest(BaseModel):
    name: str = Field(min_length=1, description="The served model name: '<task>', '<task>:challenger'")
    variant: dict[str, Any] = Field(description="The GGUF variant's files (VariantFiles: name, path, format, "
                                                "engine, ...); its source_version, the task adapter version it was "
                                                "made from, keeps it serving while that adapter is the registry's "
                                                "champion")
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
