"""The endpoint's settings, read once: from the command line, else from ``GENOPS_<NAME>``
environment variables, else the defaults below.

The server is a program of its own, so it reads its environment here and nowhere else. Every
field but ``api_keys`` is also a command-line option of ``genops_assets.serving.cli``
(``--max-batch`` for ``max_batch``); API keys come only from the environment, since a command
line is visible to every user of the machine.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from genops_assets.serving.protection import parse_api_keys

ENV_PREFIX = "GENOPS_"
ENVIRONMENT_ONLY = frozenset({"api_keys"})


def env_name(field: str) -> str:
    """The environment variable of a settings field."""
    return ENV_PREFIX + field.upper()


API_KEYS_ENV = env_name("api_keys")


class ServerSettings(BaseSettings):
    """How the endpoint serves: batching, limits, protection, canary share, resource sampling."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore", frozen=True)

    default_max_tokens: int = Field(256, ge=1, description="max_tokens of a request that sets none (at most the "
                                                          "room its prompt leaves in the model's context)")
    max_batch: int = Field(8, ge=1, description="conversations decoding together at most")
    batch_wait_ms: float = Field(10.0, ge=0, description="how long a static batch waits for more requests to join")
    scheduler: Literal["continuous", "static"] = Field(
        "continuous", description="continuous: requests join the running batch between decoding steps; "
                                  "static: one whole batch at a time")
    request_timeout_s: float = Field(600.0, gt=0, description="a request still unanswered after this is "
                                                              "cancelled and answered 504")
    max_input_tokens: int = Field(4096, ge=1, description="prompt tokens a request may send")
    max_output_tokens: int = Field(4096, ge=1, description="the highest max_tokens accepted")
    context_tokens: int | None = Field(None, ge=1, description="prompt plus max_tokens must fit this (default: "
                                                              "the model's max_position_embeddings)")
    max_body_bytes: int = Field(1 << 20, ge=1, description="request body limit (larger: 413)")
    rate_limit_rpm: float = Field(0.0, ge=0, description="requests a minute per API key (per client address "
                                                         "without keys); 0: no limit")
    rate_limit_burst: int | None = Field(None, ge=1, description="requests a client may send at once (default: "
                                                                 "one minute's worth)")
    canary_share: float = Field(0.0, ge=0, le=1, description="share of a task's champion requests answered by "
                                                             "that task's challenger when one is loaded (0..1)")
    canary_shares: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict, description="per-task canary shares over canary_share, as task=share,... "
                                          "(e.g. support_triage=0.1,product_qa=0)")
    pinned_versions: int = Field(4, ge=1, description="registry versions (<task>:v<N>) kept loaded per task; "
                                                       "loading one more unloads the task's oldest")
    tasks_dir: Path | None = Field(None, description="the folder of task folders: a task whose folder is gone is "
                                                     "no longer served (its requests get a 404); unset: not checked")
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="bearer keys accepted on /v1/*, comma-separated (none: open, with a warning)")
    guardrails: Literal["on", "off"] = Field(
        "on", description="off: no guardrail checks (the request log is still redacted); for internal servers "
                          "such as the local judge, whose prompts quote the answers they judge")
    injection_detector: str = Field(
        "genops_assets.lib.guardrails.injection:InjectionDetector.load",
        description="module:factory building the prompt-injection detector of the guardrails (default: the "
                    "classifier genops ships)")
    llamacpp_n_ctx: int = Field(2048, ge=16, description="context tokens of each llama.cpp server serving a GGUF "
                                                         "variant (prompt plus max_tokens must fit)")
    llamacpp_threads: int | None = Field(None, ge=1, description="CPU threads of each llama.cpp server (default: "
                                                                 "llama.cpp's choice)")
    quantization: Literal["none", "nf4", "int8"] = Field(
        "none", description="load the base model in 4-bit NF4 or 8-bit through bitsandbytes (GPU, or bitsandbytes' "
                            "CPU backend); refused at start when this machine cannot")
    resource_sample_s: float = Field(5.0, ge=0, allow_inf_nan=False,
                                     description="seconds between samples of the process's CPU, memory and GPU "
                                                 "memory into resources.jsonl; 0: off")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        return parse_api_keys(value) if isinstance(value, str) else value

    @field_validator("canary_shares", mode="before")
    @classmethod
    def _split_shares(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        shares: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            task, sep, share = item.partition("=")
            if not sep or not task.strip():
                raise ValueError(f"expected task=share, got {item!r}")
            shares[task.strip()] = share.strip()
        return shares

    @field_validator("canary_shares")
    @classmethod
    def _check_shares(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {task: share for task, share in value.items() if not 0 <= share <= 1}
        if bad:
            raise ValueError(f"canary shares must be between 0 and 1, got {bad}")
        return value

    def canary(self, task: str) -> float:
        """The share of ``task``'s champion requests its challenger answers."""
        return self.canary_shares.get(task, self.canary_share)

    @property
    def batch_wait_s(self) -> float:
        return self.batch_wait_ms / 1000.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **values: Any) -> ServerSettings:
        """``values`` over the ``GENOPS_*`` variables of ``env`` (by default the process
        environment); a bad value is a ValueError naming its variable."""
        try:
            if env is None:
                return cls(**values)
            given = {name: env[env_name(name)] for name in cls.model_fields
                     if env.get(env_name(name), "").strip()}
            return cls(**{**given, **values})
        except ValidationError as exc:
            raise ValueError("; ".join(f"{env_name(str(e['loc'][0]))}: {e['msg']} (got {e['input']!r})"
                                       for e in exc.errors())) from None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, defaults: ServerSettings) -> None:
        """One option per field (not the environment-only ones), defaulting to ``defaults``."""
        for name, field in cls.model_fields.items():
            if name in ENVIRONMENT_ONLY:
                continue
            option: dict[str, Any] = {"default": getattr(defaults, name), "dest": name,
                                      "help": f"{field.description} (env {env_name(name)})"}
            kinds = [k for k in typing.get_args(field.annotation) if k is not type(None)]
            if typing.get_origin(field.annotation) is Literal:
                option["choices"] = kinds
            elif typing.get_origin(field.annotation) is dict:  # task=value,... parsed by the field's validator
                option["type"] = str
            else:
                option["type"] = kinds[0] if kinds else field.annotation
            parser.add_argument("--" + name.replace("_", "-"), **option)

    @classmethod
    def from_arguments(cls, parser: argparse.ArgumentParser, args: argparse.Namespace) -> ServerSettings:
        """The settings the parsed options give; a bad value is a usage error naming its option."""
        given = {name: getattr(args, name) for name in cls.model_fields if name not in ENVIRONMENT_ONLY}
        try:
            return cls(**given)
        except ValidationError as exc:
            problems = "; ".join(f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        parser.error(problems)
