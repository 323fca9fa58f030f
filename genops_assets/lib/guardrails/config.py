"""A task's guardrail settings: ``tasks/<task>/guardrails.yaml``, typed and versioned.

Every knob has its default here, so a task without the file is guarded by the defaults. The
version is a digest of the validated settings (not of the file's text): comments and key
order do not make a new version, a changed threshold does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from genops_assets.lib.guardrails.pii import DEFAULT_ENTITIES, DEFAULT_MIN_SCORE
from genops_assets.lib.hashing import sha256_text

GUARDRAILS_FILE = "guardrails.yaml"


class GuardrailConfigError(ValueError):
    """A guardrail settings file is malformed; the message names the file and the setting."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InjectionSettings(_Section):
    enabled: bool = True
    threshold: float = Field(0.5, ge=0, le=1, description="Classifier score at or above which input is refused")
    heuristics: bool = Field(True, description="Also refuse when a heuristic rule fires")


class PiiSettings(_Section):
    action: Literal["redact", "block", "off"] = "redact"
    entities: tuple[str, ...] = DEFAULT_ENTITIES
    min_score: float = Field(DEFAULT_MIN_SCORE, ge=0, le=1)

    @field_validator("entities")
    @classmethod
    def _named(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("name at least one entity (or set action: off)")
        bad = [e for e in value if not re.fullmatch(r"[A-Z][A-Z0-9_]*", e)]
        if bad:
            raise ValueError(f"entity names are Presidio's upper-case names (EMAIL_ADDRESS), got {bad}")
        return value


class InputSettings(_Section):
    max_chars: int = Field(8000, ge=1, description="Characters of all messages together, after normalisation")
    max_tokens: int = Field(1024, ge=1, description="Tokens of all messages, with the served tokenizer")
    normalize: bool = Field(True, description="NFKC and strip invisible / control characters (keep \\n \\t)")
    injection: InjectionSettings = InjectionSettings()
    pii: PiiSettings = PiiSettings()


class ToxicitySettings(_Section):
    enabled: bool = True
    threshold: float = Field(0.8, ge=0, le=1, description="Profanity probability at or above which output is refused")


class CanarySettings(_Section):
    enabled: bool = True
    inject: bool = Field(False, description="Add a secret token to the system prompt; its appearance is a leak")
    min_span_words: int = Field(8, ge=3, description="Words of the system prompt, verbatim, that count as a leak")


class OutputSettings(_Section):
    pii: PiiSettings = PiiSettings()
    toxicity: ToxicitySettings = ToxicitySettings()
    canary: CanarySettings = CanarySettings()
    escape_markup: bool = Field(True, description="Escape HTML; neutralise markdown links/images to absolute URLs")


class RefusalSettings(_Section):
    input: str = Field("I can't help with that request.", min_length=1)
    output: str = Field("I can't provide that answer.", min_length=1)


class GuardrailConfig(_Section):
    """What ``guardrails.yaml`` says, with its defaults."""

    input: InputSettings = InputSettings()
    output: OutputSettings = OutputSettings()
    refusal: RefusalSettings = RefusalSettings()

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def guardrails_version(cfg: GuardrailConfig) -> str:
    """First 12 hex digits of the sha256 of the settings' canonical JSON."""
    return sha256_text(cfg.canonical_json())[:12]


def parse_guardrails(data: object, where: str) -> GuardrailConfig:
    """Settings from parsed YAML/JSON ``data`` (None: the defaults); errors name ``where`` and
    the setting. PII entity names are checked against Presidio when the engine is built (building
    Presidio's analyzer takes seconds, too long for loading a task)."""
    from genops_assets.lib.tasks import validated  # tasks imports this module

    return validated(GuardrailConfig, {} if data is None else data, where, GuardrailConfigError)


def load_guardrails(path: str | Path) -> GuardrailConfig:
    """``path`` read and validated; a missing file gives the defaults."""
    path = Path(path)
    if not path.is_file():
        return GuardrailConfig()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise GuardrailConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_guardrails(data, str(path))
