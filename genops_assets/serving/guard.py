"""Guardrails in the endpoint: each task's settings, re-read when they change, and the output
check of a streamed answer.

Each task's settings live in ``<state_dir>/guardrails/<task>.json`` (the validated
``guardrails.yaml``, written by the deploy step through ``publish_guardrails``); the server
re-reads a file when it changes, like the prompt files, so new settings need no restart. The
base model, and a task without a file, get the defaults. One injection detector serves every
task (loaded once, at start).

Streaming: no unchecked text reaches the client. The answer is released in pieces as it is
generated, each time a piece ends at a safe point (whitespace after a few new words, more as
the answer grows, or a newline, with no markdown link, HTML tag or number / e-mail left open
at its end); the whole answer so far is checked before each release,
and what the client gets is the checked text. The held-back tail is checked with everything
at the end. When a check blocks after some text was sent, that text had passed the checks on
its own; the stream ends there with ``finish_reason: content_filter`` and the ``guardrail``
object (when nothing was sent yet, the client gets the output refusal, as without streaming).
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from genops_assets.lib.guardrails.config import GuardrailConfig, parse_guardrails
from genops_assets.lib.guardrails.engine import Guardrails, Verdict
from genops_assets.serving.protocol import CHAMPION, ModelName

log = logging.getLogger("genops.serving")

GUARDRAILS_DIR = "guardrails"
# A piece holds at least this many new words, or a quarter of what was sent before it (so an
# answer of n words costs O(log n) whole-answer checks, and its first words come quickly).
STREAM_RELEASE_WORDS = 2
STREAM_GROWTH = 0.25


def guardrails_file(state_dir: Path, task: str) -> Path:
    """Where the deploy step writes ``task``'s guardrail settings."""
    return Path(state_dir) / GUARDRAILS_DIR / f"{ModelName.of(task, CHAMPION).task}.json"


def load_detector(spec: str):
    """The injection detector ``module:factory`` (``factory`` may be dotted: ``Class.load``) builds."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"injection detector {spec!r}: expected module:factory")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"injection detector {spec!r}: cannot import {module_name} ({exc}); name another with "
                         "--injection-detector (GENOPS_INJECTION_DETECTOR)") from exc
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"injection detector {spec!r}: {module_name} has no {attr}")
        target = getattr(target, part)
    return target()


# Every check off: what a server started with ``--guardrails off`` applies to every request.
CHECKS_OFF = GuardrailConfig.model_validate({
    "input": {"max_chars": 2**62, "max_tokens": 2**62, "normalize": False, "injection": {"enabled": False},
              "pii": {"action": "off"}},
    "output": {"pii": {"action": "off"}, "toxicity": {"enabled": False}, "canary": {"enabled": False},
               "escape_markup": False}})


class TaskGuardrails:
    """Each task's guardrails, re-read when its settings file changes (``enabled`` False: every
    check off for every task, whatever the files say)."""

    def __init__(self, state_dir: Path, detector_spec: str, count_tokens: Callable[[str], int] | None = None,
                 enabled: bool = True):
        self.folder = Path(state_dir) / GUARDRAILS_DIR
        self.enabled, self.count_tokens = enabled, count_tokens
        self.detector = load_detector(detector_spec) if enabled else None
        self.default = self._build(GuardrailConfig() if enabled else CHECKS_OFF)
        self._cache: dict[str, tuple[int, Guardrails]] = {}

    def _build(self, cfg: GuardrailConfig) -> Guardrails:
        return Guardrails(cfg, self.count_tokens, detector=self.detector)

    def for_task(self, task: str | None) -> Guardrails:
        """``task``'s guardrails (the defaults for the base model or a task without settings);
        ValueError naming the file when its settings are unreadable."""
        if task is None or not self.enabled:
            return self.default
        path = self.folder / f"{task}.json"
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            self._cache.pop(task, None)
            return self.default
        cached = self._cache.get(task)
        if cached is None or cached[0] != mtime:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ValueError(f"{path}: not a guardrails settings file ({exc})") from exc
            guard = self._build(parse_guardrails(data, str(path)))
            if cached is None or cached[1].version != guard.version:
                log.info("task %s: guardrails %s", task, guard.version)
            cached = (mtime, guard)
            self._cache[task] = cached
        return cached[1]

    def versions(self) -> dict[str, str]:
        tasks = sorted(p.stem for p in self.folder.glob("*.json")) if self.folder.is_dir() else []
        out = {}
        for task in tasks:
            try:
                out[task] = self.for_task(task).version
            except ValueError as exc:
                out[task] = f"unreadable: {exc}"
        return out


# A piece may end where the text before it leaves no markdown link, tag, number or address
# open. A link label still open after LABEL_LOOKBACK characters no longer holds text back (a link
# closing over released text later is caught by ``finish``: the stream ends content_filter).
_OPEN_TAG = re.compile(r"<[/!?]?$")
_UNSAFE_WORD = re.compile(r"[\d@]")
LABEL_LOOKBACK = 300


def _safe_end(prefix: str) -> bool:
    label = prefix.rfind("[")
    if label > prefix.rfind("]") and len(prefix) - label <= LABEL_LOOKBACK:
        return False
    if prefix.rfind("](") > prefix.rfind(")") or _OPEN_TAG.search(prefix):
        return False
    last_word = prefix.rsplit(None, 1)[-1] if prefix.strip() else ""
    return not _UNSAFE_WORD.search(last_word)


class OutputStream:
    """The output check of one streamed answer: ``feed`` the generated text as it comes and
    send what it returns; ``finish`` checks the whole answer and says what remains to send."""

    def __init__(self, guard: Guardrails, system_prompt: str | None):
        self.guard, self.system_prompt = guard, system_prompt
        self.text = ""  # generated so far
        self.sent = ""  # checked text sent to the client
        self.released = 0  # generated characters covered by ``sent``
        self.blocked: Verdict | None = None
        self.held = False  # a check changed text already sent: the rest waits for the end
        self.latency_ms = 0.0
        self.checks = 0

    def _check(self, text: str) -> Verdict:
        verdict = self.guard.check_output(text, self.system_prompt)
        self.latency_ms += verdict.latency_ms
        self.checks += 1
        return verdict

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.blocked is not None or self.held:
            return ""
        end = None
        for m in reversed(list(re.finditer(r"\s+", self.text[self.released:]))):  # the last safe point
            at = self.released + m.start()
            if at > self.released and _safe_end(self.text[:at]):
                end = at
                break
        if end is None:
            return ""
        piece = self.text[self.released:end]
        wanted = max(STREAM_RELEASE_WORDS, int(STREAM_GROWTH * len(self.text[:self.released].split())))
        if "\n" not in piece and len(piece.split()) < wanted:
            return ""
        verdict = self._check(self.text[:end])
        if not verdict.allowed:
            self.blocked = verdict
            return ""
        if not verdict.text.startswith(self.sent):
            self.held = True
            return ""
        new, self.sent, self.released = verdict.text[len(self.sent):], verdict.text, end
        return new

    def finish(self) -> tuple[str | None, Verdict]:
        """(the rest to send, the verdict on the whole answer); the rest is None when the
        answer is refused (see ``blocked``) or cannot follow what was sent."""
        verdict = self.blocked or self._check(self.text)
        if not verdict.allowed:
            self.blocked = verdict
            return None, verdict
        if not verdict.text.startswith(self.sent):  # rare: the safe points above should prevent it
            verdict = replace(verdict, allowed=False, check="markup", text=self.guard.cfg.refusal.output,
                              reason="a check changed text that was already sent")
            self.blocked = verdict
            return None, verdict
        return verdict.text[len(self.sent):], verdict
