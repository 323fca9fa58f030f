"""Model-based judges over any OpenAI-compatible chat endpoint.

* Rubrics are data (YAML): the built-in ones in ``genops_assets/rubrics/`` plus a task's own
  in ``tasks/<name>/rubrics/``. A rubric's version is the digest of its text.
* Choice mode: the judge picks one of a fixed set of answers ("A"/"B"/"C", or "1".."5")
  through the ``guided_choice`` request field (vLLM's structured-output extension, also
  served by genops' endpoint) with log-probabilities, so every call yields a valid verdict.
  A pointwise score is the expectation of the scale under those probabilities.
* Pairwise (AutoSxS): each pair is judged in both orders; a verdict that changes with the
  order is a tie and counted as position-inconsistent.
* Calls are cached by content, run concurrently up to a limit, and retried (tenacity) on rate
  limits, server errors and timeouts: after the ``Retry-After`` the server sent (genops' endpoint
  sends one with every 429), else with exponential backoff. A call that still fails, or a judge
  that answers outside the choices, is a recorded per-row failure, never a default score.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import yaml

from genops_assets.lib.cache import CallCache, cache_key
from genops_assets.lib.hashing import sha256_text
from genops_assets.lib.stats import LOSS, TIE, WIN

BUILTIN_RUBRICS = Path(__file__).resolve().parents[1] / "rubrics"
PAIRWISE_CHOICES = ("A", "B", "C")  # C = tie


class JudgeError(RuntimeError):
    pass


class RubricError(ValueError):
    pass


@dataclass(frozen=True)
class Rubric:
    name: str
    kind: str  # "pointwise" | "pairwise"
    system: str
    template: str
    choices: tuple[str, ...]
    version: str
    source: str
    description: str = ""

    def render(self, **variables: str) -> list[dict[str, str]]:
        try:
            user = self.template.format(**variables)
        except KeyError as exc:
            raise RubricError(f"{self.source}: template needs variable {exc} (given {sorted(variables)})") from exc
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


_VARIABLES = {"pointwise": {"input", "response", "reference"},
              "pairwise": {"input", "response_a", "response_b", "reference"}}


def load_rubric(path: Path) -> Rubric:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RubricError(f"{path}: cannot read rubric: {exc}") from exc
    if not isinstance(raw, dict):
        raise RubricError(f"{path}: a rubric is a mapping with name, kind, system, template")
    missing = [k for k in ("name", "kind", "system", "template") if k not in raw]
    if missing:
        raise RubricError(f"{path}: missing {missing}")
    kind = raw["kind"]
    if kind not in _VARIABLES:
        raise RubricError(f"{path}: kind must be pointwise or pairwise, not {kind!r}")
    choices = tuple(str(c) for c in raw.get("choices") or (PAIRWISE_CHOICES if kind == "pairwise" else "12345"))
    if kind == "pointwise" and not all(c.isdigit() for c in choices):
        raise RubricError(f"{path}: pointwise choices must be numbers (a scale), got {choices}")
    import string

    used = {f for _, f, _, _ in string.Formatter().parse(raw["template"]) if f}
    unknown = used - _VARIABLES[kind]
    if unknown:
        raise RubricError(f"{path}: unknown template variable(s) {sorted(unknown)}; allowed {sorted(_VARIABLES[kind])}")
    text = path.read_text(encoding="utf-8")
    return Rubric(name=str(raw["name"]), kind=kind, system=str(raw["system"]).strip(),
                  template=str(raw["template"]).strip(), choices=choices, version=sha256_text(text)[:12],
                  source=str(path), description=str(raw.get("description", "")).strip())


def load_rubrics(*dirs: Path) -> dict[str, Rubric]:
    """Rubrics by name; a later folder (a task's own) overrides an earlier one (built-in)."""
    out: dict[str, Rubric] = {}
    for d in dirs:
        if d and Path(d).is_dir():
            for p in sorted(Path(d).glob("*.yaml")):
                r = load_rubric(p)
                out[r.name] = r
    return out


@dataclass(frozen=True)
class Verdict:
    choice: str
    probabilities: dict[str, float]
    explanation: str | None = None
    cached: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Failure:
    error: str


@dataclass
class Usage:
    calls: int = 0
    cached: int = 0
    failures: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self, price_in_per_1k: float | None = None, price_out_per_1k: float | None = None) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("calls", "cached", "failures", "retries", "prompt_tokens",
                                           "completion_tokens")}
        if price_in_per_1k is not None or price_out_per_1k is not None:
            d["cost"] = round(self.prompt_tokens / 1000 * (price_in_per_1k or 0.0)
                              + self.completion_tokens / 1000 * (price_out_per_1k or 0.0), 6)
        return d


# A Retry-After longer than this is cut to it: a judge call waits minutes at most, not hours.
MAX_RETRY_AFTER_S = 60.0


def _retryable(exc: BaseException) -> bool:
    import openai

    if isinstance(exc, (openai.RateLimitError, openai.APITimeoutError, openai.APIConnectionError)):
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500


def retry_after_s(exc: BaseException | None) -> float | None:
    """The wait an HTTP error asked for (``Retry-After``: seconds or an HTTP date; or
    ``retry-after-ms``), at most ``MAX_RETRY_AFTER_S``; None when it asked for none."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    try:
        if headers.get("retry-after-ms") is not None:
            return min(max(float(headers["retry-after-ms"]) / 1000.0, 0.0), MAX_RETRY_AFTER_S)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            seconds = float(value)
        except ValueError:
            seconds = (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
    except (TypeError, ValueError):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class ChatJudge:
    """A judge model behind an OpenAI-compatible endpoint."""

    def __init__(self, base_url: str, model: str, api_key: str = "unused", timeout_s: float = 120.0,
                 max_retries: int = 4, backoff_s: float = 0.5, max_concurrency: int = 8, explain: bool = False,
                 explain_tokens: int = 48, cache: CallCache | None = None, client=None,
                 sleep: Callable[[float], None] = time.sleep, model_version: str = ""):
        from openai import OpenAI

        self.base_url, self.model = base_url, model
        # A served name whose weights change (a task's tuned judge, ``<task>:judge``) names its
        # version here, so cached verdicts of an earlier version are never reused.
        self.model_version = model_version
        self.max_retries, self.backoff_s, self.max_concurrency = max_retries, backoff_s, max(1, max_concurrency)
        self.explain, self.explain_tokens = explain, explain_tokens
        self.cache = cache
        self.usage = Usage()
        self._sleep = sleep
        self._client = client or OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)

    @property
    def _cache_model(self) -> str:
        return f"{self.model}@{self.model_version}" if self.model_version else self.model

    # -- one call -----------------------------------------------------------------------
    def _wait(self, state) -> float:
        asked = retry_after_s(state.outcome.exception())
        if asked is not None:
            return asked
        return self.backoff_s * (2 ** (state.attempt_number - 1)) * (1 + 0.25 * random.random())

    def _with_retries(self, fn: Callable[[], Any]) -> Any:
        from tenacity import Retrying, retry_if_exception, stop_after_attempt

        retrying = Retrying(stop=stop_after_attempt(self.max_retries + 1), retry=retry_if_exception(_retryable),
                            wait=self._wait, sleep=self._sleep, reraise=True,
                            before_sleep=lambda state: self.usage.add(retries=1))
        return retrying(fn)

    def _choose_uncached(self, messages: Sequence[Mapping[str, str]], choices: Sequence[str]) -> Verdict:
        resp = self._with_retries(lambda: self._client.chat.completions.create(
            model=self.model, messages=list(messages), max_tokens=8, temperature=0.0, logprobs=True,
            top_logprobs=len(choices), extra_body={"guided_choice": list(choices)}))
        self.usage.add(calls=1, prompt_tokens=resp.usage.prompt_tokens if resp.usage else 0,
                       completion_tokens=resp.usage.completion_tokens if resp.usage else 0)
        content = (resp.choices[0].message.content or "").strip()
        probs: dict[str, float] = {}
        lp = resp.choices[0].logprobs
        if lp is not None and lp.content:
            for t in lp.content[0].top_logprobs or []:
                tok = t.token.strip()
                if tok in choices:
                    probs[tok] = probs.get(tok, 0.0) + math.exp(t.logprob)
        if content not in choices:
            raise JudgeError(f"judge '{self.model}' answered {content[:60]!r}, not one of {list(choices)}")
        if not probs:
            probs = {content: 1.0}
        total = sum(probs.values())
        probs = {c: probs.get(c, 0.0) / total for c in choices}
        explanation = None
        if self.explain:
            follow = [*messages, {"role": "assistant", "content": content},
                      {"role": "user", "content": "In one sentence, why?"}]
            er = self._with_retries(lambda: self._client.chat.completions.create(
                model=self.model, messages=follow, max_tokens=self.explain_tokens, temperature=0.0))
            self.usage.add(calls=1, prompt_tokens=er.usage.prompt_tokens if er.usage else 0,
                           completion_tokens=er.usage.completion_tokens if er.usage else 0)
            explanation = (er.choices[0].message.content or "").strip()
        return Verdict(content, probs, explanation,
                       prompt_tokens=resp.usage.prompt_tokens if resp.usage else 0,
                       completion_tokens=resp.usage.completion_tokens if resp.usage else 0)

    def choose(self, messages: Sequence[Mapping[str, str]], choices: Sequence[str], version: str = "") -> Verdict:
        key = cache_key(kind="judge", endpoint=self.base_url, model=self._cache_model, version=version,
                        messages=list(messages), choices=list(choices), explain=self.explain)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.usage.add(cached=1)
                return Verdict(**{**hit, "cached": True})
        verdict = self._choose_uncached(messages, choices)
        if self.cache is not None:
            self.cache.put(key, "judge", {**asdict(verdict), "cached": False})
        return verdict

    def complete(self, messages: Sequence[Mapping[str, str]], max_tokens: int = 256, temperature: float = 0.0,
                 seed: int | None = None, version: str = "") -> str:
        """Free text from the model (teacher use: rewriting prompts), cached like verdicts."""
        key = cache_key(kind="completion", endpoint=self.base_url, model=self._cache_model, version=version,
                        messages=list(messages), max_tokens=max_tokens, temperature=temperature, seed=seed)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.usage.add(cached=1)
                return hit["text"]
        resp = self._with_retries(lambda: self._client.chat.completions.create(
            model=self.model, messages=list(messages), max_tokens=max_tokens, temperature=temperature, seed=seed))
        self.usage.add(calls=1, prompt_tokens=resp.usage.prompt_tokens if resp.usage else 0,
                       completion_tokens=resp.usage.completion_tokens if resp.usage else 0)
        text = resp.choices[0].message.content or ""
        if self.cache is not None:
            self.cache.put(key, "completion", {"text": text})
        return text

    def choose_many(self, items: Sequence[tuple[Sequence[Mapping[str, str]], Sequence[str], str]],
                    on_done: Callable[[int, int], None] | None = None) -> list[Verdict | Failure]:
        """Judge every item concurrently (up to ``max_concurrency``); failures are returned, not raised."""
        done = [0]
        lock = threading.Lock()

        def one(item):
            msgs, choices, version = item
            try:
                out: Verdict | Failure = self.choose(msgs, choices, version)
            except Exception as exc:
                self.usage.add(failures=1)
                out = Failure(f"{type(exc).__name__}: {exc}")
            with lock:
                done[0] += 1
                if on_done:
                    on_done(done[0], len(items))
            return out

        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(one, items))


# -- pointwise and pairwise ------------------------------------------------------------

def expected_score(verdict: Verdict) -> float:
    """The scale's expectation under the judge's probabilities (a smooth 1-5 score)."""
    return sum(int(c) * p for c, p in verdict.probabilities.items())


def pairwise_outcome(candidate_first: str, candidate_second: str) -> tuple[str, bool]:
    """Combine the two orders of one pair into the candidate's outcome and a consistency flag.

    ``candidate_first`` is the verdict with the candidate shown as A, ``candidate_second``
    with the candidate shown as B. "C" is a tie. The pair is consistent only when both orders
    give the candidate the same outcome; otherwise it counts as a tie.
    """
    as_a = {"A": WIN, "B": LOSS, "C": TIE}
    as_b = {"B": WIN, "A": LOSS, "C": TIE}
    if candidate_first not in as_a or candidate_second not in as_b:
        raise ValueError(f"pairwise verdicts must be A, B or C, got {candidate_first!r}, {candidate_second!r}")
    first, second = as_a[candidate_first], as_b[candidate_second]
    return (first, True) if first == second else (TIE, False)
