"""Which task version answers a request, and with which prompt.

One server serves every task. The adapters it holds are keyed by their served model name
(``support_triage``, ``support_triage:challenger``, ``support_triage:v3``; see
``protocol.ModelName``); ``Router.resolve`` turns a requested name into the adapter that
answers it (the task's challenger for a canary share of its champion requests), or a
``ModelNotFound`` that names the model and lists what is served.

Each task's deployed prompt lives in ``<state_dir>/prompts/<task>.json`` (written by the deploy
step, re-read when the file changes): ``prompt_variables`` are rendered with it, and a bare
chat request gets it too (``bare_chat``).

A task whose folder was removed from ``tasks_dir`` is no longer served: its models leave
``/v1/models`` and its requests are refused with a 404 that says so, while its adapters stay
loaded, so putting the folder back serves it again at once. The other tasks never notice.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genops_assets.serving.adapters import LoadedModel
from genops_assets.serving.protocol import BASE_NAME, CHALLENGER, CHAMPION, ModelName, ModelNameError
from genops_assets.serving.settings import ServerSettings

PROMPTS_DIR = "prompts"
FOLDER_CHECK_S = 1.0  # how long a "task folder present" answer is reused (a stat per request otherwise)


class ModelNotFound(LookupError):
    """The requested model is not served; the message names it and lists what is."""


def prompt_file(state_dir: Path, task: str) -> Path:
    """Where the deploy step writes ``task``'s deployed prompt."""
    return Path(state_dir) / PROMPTS_DIR / f"{ModelName.of(task, CHAMPION).task}.json"


class DeployedPrompts:
    """Each task's deployed prompt version, re-read when its file changes."""

    def __init__(self, state_dir: Path):
        self.folder = Path(state_dir) / PROMPTS_DIR
        self._cache: dict[str, tuple[int, str, Any, Any]] = {}

    def current(self, task: str):
        """(version, template) of ``task``'s deployed prompt, or None when none is deployed."""
        from genops_assets.lib.prompts import PromptTemplate

        path = self.folder / f"{task}.json"
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        cached = self._cache.get(task)
        if cached is None or cached[0] != mtime:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                cached = (mtime, str(data["version"]), PromptTemplate(**data["template"]), data.get("output_schema"))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}: not a deployed prompt ({exc})") from exc
            self._cache[task] = cached
        return cached[1], cached[2]

    def output_schema(self, task: str) -> dict[str, Any] | None:
        """The JSON schema ``task``'s answers are held to (published with its prompt when the
        task decodes constrained), or None."""
        if self.current(task) is None:
            return None
        schema = self._cache[task][3]
        if schema is not None and not isinstance(schema, dict):
            raise ValueError(f"{self.folder / f'{task}.json'}: output_schema must be a JSON object")
        return schema

    def tasks(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.json")) if self.folder.is_dir() else []


@dataclass(frozen=True)
class Route:
    """What answers a request: the model asked (canonical) and the one serving it."""

    asked: ModelName
    served: ModelName
    version: str | None
    engine: str = "local"  # "local" (the genops engine) | "llamacpp" (a GGUF variant's server)
    variant: Any = field(default=None, compare=False)  # the llamacpp.VariantRoute answering it

    @property
    def task(self) -> str | None:
        return self.asked.task

    @property
    def adapter(self) -> str | None:
        """The adapter's key in the loaded model (None: the base model)."""
        return None if self.served.task is None else self.served.served


def task_defined(tasks_dir: Path, task: str) -> bool:
    """Whether a folder of ``tasks_dir`` defines ``task``: the folder of that name, or one whose
    ``task.yaml`` names it (``name:``)."""
    if (tasks_dir / task).is_dir():
        return True
    import yaml

    for config in tasks_dir.glob("*/task.yaml"):
        try:
            data = yaml.safe_load(config.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue  # a broken folder defines nothing; the code location reports it
        if isinstance(data, dict) and data.get("name") == task:
            return True
    return False


class Router:
    """Resolves model names against the adapters loaded now (``loaded.adapters``, keyed by
    served name), the GGUF variants served by llama.cpp (``variants``: served name -> route,
    over an adapter of the same name) and their registry versions (``versions``, served name ->
    version)."""

    def __init__(self, loaded: LoadedModel, versions: Mapping[str, str], settings: ServerSettings,
                 prompts: DeployedPrompts, rng: Callable[[], float] = random.random,
                 variants: Mapping[str, Any] | None = None):
        self.loaded, self.versions, self.settings, self.prompts, self.rng = loaded, versions, settings, prompts, rng
        self.variants: Mapping[str, Any] = {} if variants is None else variants
        self._present: dict[str, tuple[float, bool]] = {}

    def served(self) -> set[str]:
        """The task models served now, by either engine."""
        return set(self.loaded.adapters) | set(list(self.variants))

    def removed(self, task: str) -> bool:
        """Whether ``task``'s folder is gone from ``tasks_dir`` (never, when no tasks_dir is set)."""
        tasks_dir = self.settings.tasks_dir
        if tasks_dir is None:
            return False
        now = time.monotonic()
        seen = self._present.get(task)
        if seen is None or now - seen[0] > FOLDER_CHECK_S:
            seen = (now, task_defined(Path(tasks_dir), task))
            self._present[task] = seen
        return not seen[1]

    def models(self) -> list[ModelName]:
        """Every model served now: the base, then each present task's loaded versions."""
        names = [ModelName.parse(n) for n in sorted(self.served())]
        return [ModelName(None, BASE_NAME), *(m for m in names if not self.removed(m.task))]

    def names(self) -> list[str]:
        return [m.served for m in self.models()]

    def tasks(self) -> list[str]:
        """The tasks with a version loaded or a prompt deployed (removed ones included)."""
        return sorted({m.task for m in map(ModelName.parse, self.served())} | set(self.prompts.tasks()))

    def knows(self, task: str) -> bool:
        """Whether ``task`` has a version loaded or a prompt deployed (without listing every task)."""
        return (any(ModelName.parse(n).task == task for n in self.served())
                or (self.prompts.folder / f"{task}.json").is_file())

    def parse(self, name: str) -> ModelName:
        """The model ``name`` asks for, or ModelNotFound when it names no task served here."""
        try:
            model = ModelName.parse(name)
        except ModelNameError as exc:
            raise ModelNotFound(f"The model '{name}' does not exist: {exc} (served: {self.names()})") from None
        if model.task is None:
            return model
        if not self.knows(model.task):
            raise ModelNotFound(f"The model '{name}' does not exist: no task '{model.task}' is served here "
                                f"(served: {self.names()})")
        if self.removed(model.task):
            raise ModelNotFound(f"The model '{name}' is no longer served: the folder of task '{model.task}' was "
                                f"removed from {self.settings.tasks_dir} (served: {self.names()})")
        return model

    def resolve(self, name: str) -> Route:
        """The route of a request for ``name``; ModelNotFound when that model is not loaded."""
        asked = self.parse(name)
        served_now = self.served()
        if asked.task is not None and asked.served not in served_now:
            raise ModelNotFound(f"The model '{name}' does not exist: task '{asked.task}' has no {asked.slot} "
                                f"loaded (served: {self.names()})")
        served = asked
        if asked.task is not None and asked.slot == CHAMPION:
            share = self.settings.canary(asked.task)
            challenger = ModelName.of(asked.task, CHALLENGER)
            if share > 0 and challenger.served in served_now and self.rng() < share:
                served = challenger
        variant = self.variants.get(served.served) if served.task is not None else None
        if variant is not None:
            return Route(asked, served, variant.version, variant.engine, variant)
        return Route(asked, served, self.versions.get(served.served))


PROMPT_SOURCES = ("prompt_variables", "bare_chat")


def bare_chat(template, messages: Sequence[Mapping[str, str]]) -> tuple[list[dict[str, str]], dict[str, str]] | None:
    """A bare chat request to a task model, with the task's deployed prompt applied: the last
    user message's text becomes the template's input variable, and that message is replaced by
    the rendered prompt (the system message first, then the earlier turns, then the rendered user
    message). A request that brings a system message of its own keeps its messages as they are
    (None). Returns (messages, the variables used); a template that needs more than the input
    (``{contexts}``) raises PromptError naming what is missing."""
    if any(m["role"] == "system" for m in messages):
        return None
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:
        raise ValueError("a bare chat request needs a user message (its text is the prompt's input)")
    variables = {template.input_field: messages[last]["content"]}
    rendered = template.render(variables)
    system = [m for m in rendered if m["role"] == "system"]
    user = [m for m in rendered if m["role"] == "user"]
    earlier = [dict(m) for m in messages[:last]]
    later = [dict(m) for m in messages[last + 1:]]
    return [*system, *earlier, *user, *later], variables


HEADER_PREFIX = "x-genops-"
_UNSAFE_HEADER = re.compile(r"[^\x20-\x7e]")


def response_headers(task: str | None, served_by: str, version: str | None,
                     prompt_version: str | None) -> dict[str, str]:
    """Which task, served model, adapter version and prompt version answered (task models only)."""
    if task is None:
        return {}
    values = {"task": task, "served-by": served_by, "model-version": version, "prompt-version": prompt_version}
    return {HEADER_PREFIX + k: _UNSAFE_HEADER.sub("?", str(v)) for k, v in values.items() if v is not None}
