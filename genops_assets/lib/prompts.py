"""Prompt templates as versioned artifacts: one definition used by tuning, evaluation and serving.

A ``PromptTemplate`` is the system and user templates (Python ``str.format`` syntax, literal
braces doubled), the task's input variable, the optional ``{few_shot}`` slot, the
``{contexts}`` slot of tasks whose examples carry retrieved passages, and the generation
parameters. Its digest identifies it: the same text twice is the same version.
In MLflow's prompt registry it is stored as a chat template (``{{ variable }}`` syntax) with
the generation parameters as the prompt's model config.
"""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from genops_assets.lib.hashing import sha256_json

FEW_SHOT_VARIABLE = "few_shot"
CONTEXTS_VARIABLE = "contexts"
PRODUCTION = "production"
CANDIDATE = "candidate"
DIGEST_TAG = "genops.template_digest"

_REGISTRY_VAR = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class PromptError(ValueError):
    """A template is malformed, uses an unknown variable, or a prompt version/alias is missing."""


def template_variables(template: str, where: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise PromptError(f"{where}: malformed template ({exc}); write literal braces as {{{{ }}}}") from exc


def format_contexts(passages: Sequence[str]) -> str:
    """Retrieved passages as the ``{contexts}`` slot shows them: numbered, one block each, in
    retrieval order (the model may cite them by number)."""
    return "\n\n".join(f"[{i}] {p.strip()}" for i, p in enumerate(passages, start=1))


@dataclass(frozen=True)
class PromptTemplate:
    system: str
    user: str
    input_field: str
    max_new_tokens: int = 128
    temperature: float = 0.0

    def validate(self, where: str = "prompt") -> PromptTemplate:
        """Raise ``PromptError`` naming the template and variable when something is wrong."""
        allowed = {self.input_field, FEW_SHOT_VARIABLE, CONTEXTS_VARIABLE}
        for role, text in (("system", self.system), ("user", self.user)):
            if not text.strip() and role == "user":
                raise PromptError(f"{where}: the {role} template is empty")
            unknown = template_variables(text, f"{where} ({role})") - allowed
            if unknown:
                raise PromptError(f"{where} ({role}): unknown template variable(s) {sorted(unknown)}; "
                                  f"allowed: {sorted(allowed)}")
        if "{" + self.input_field + "}" not in self.user:
            raise PromptError(f"{where} (user): must contain {{{self.input_field}}}")
        if self.max_new_tokens < 1:
            raise PromptError(f"{where}: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise PromptError(f"{where}: temperature must be in [0, 2], got {self.temperature}")
        return self

    @property
    def digest(self) -> str:
        return sha256_json({"system": self.system, "user": self.user, "input_field": self.input_field,
                            "max_new_tokens": self.max_new_tokens, "temperature": self.temperature})

    def render(self, variables: Mapping[str, str | Sequence[str]]) -> list[dict[str, str]]:
        """Chat messages; ``contexts`` may be given as the list of passages (formatted here, so
        evaluation, training and the endpoint show them alike)."""
        values = {FEW_SHOT_VARIABLE: "", **variables}
        if self.input_field not in values:
            raise PromptError(f"prompt needs the variable '{self.input_field}'")
        passages = values.get(CONTEXTS_VARIABLE)
        if passages is not None and not isinstance(passages, str):
            if not passages:
                raise PromptError(f"'{CONTEXTS_VARIABLE}' is an empty list; give at least one passage")
            values[CONTEXTS_VARIABLE] = format_contexts(passages)
        needed = template_variables(self.system, "system template") | template_variables(self.user, "user template")
        missing = sorted(needed - set(values))
        if missing:
            raise PromptError(f"prompt needs the variable(s) {missing}")
        messages = []
        if self.system.strip():
            messages.append({"role": "system", "content": self.system.format(**values)})
        messages.append({"role": "user", "content": self.user.format(**values)})
        return messages

    def text(self) -> str:
        """The whole template as one readable text (for diffs and reports)."""
        return (f"# system\n{self.system}\n\n# user\n{self.user}\n\n# generation\n"
                f"max_new_tokens: {self.max_new_tokens}\ntemperature: {self.temperature}\n")

    def with_system(self, system: str) -> PromptTemplate:
        return replace(self, system=system)

    # -- the registry's representation -------------------------------------------------------

    def to_registry(self) -> tuple[list[dict[str, str]], dict[str, Any]]:
        """Chat template in the registry's ``{{ var }}`` syntax, and its model config."""
        chat = [{"role": "system", "content": _to_registry_syntax(self.system)},
                {"role": "user", "content": _to_registry_syntax(self.user)}]
        return chat, {"max_tokens": self.max_new_tokens, "temperature": self.temperature}

    @classmethod
    def from_registry(cls, chat: Sequence[Mapping[str, Any]], model_config: Mapping[str, Any] | None,
                      input_field: str) -> PromptTemplate:
        parts = {m["role"]: _from_registry_syntax(str(m["content"])) for m in chat}
        cfg = dict(model_config or {})
        return cls(system=parts.get("system", ""), user=parts.get("user", ""), input_field=input_field,
                   max_new_tokens=int(cfg.get("max_tokens", 128)), temperature=float(cfg.get("temperature", 0.0)))


def _to_registry_syntax(template: str) -> str:
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if name is not None:
            out.append("{{" + name + "}}")
    return "".join(out)


def _from_registry_syntax(template: str) -> str:
    out, pos = [], 0
    for m in _REGISTRY_VAR.finditer(template):
        out.append(template[pos:m.start()].replace("{", "{{").replace("}", "}}"))
        out.append("{" + m.group(1) + "}")
        pos = m.end()
    out.append(template[pos:].replace("{", "{{").replace("}", "}}"))
    return "".join(out)


@dataclass(frozen=True)
class PromptRef:
    """One registered version: registry name, version number, the template, its aliases."""

    name: str
    version: int
    template: PromptTemplate
    aliases: tuple[str, ...] = ()
    commit_message: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return self.template.digest

    @property
    def uri(self) -> str:
        return f"prompts:/{self.name}/{self.version}"

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "digest": self.digest, "uri": self.uri,
                "aliases": list(self.aliases), "commit_message": self.commit_message}

    def served(self) -> dict[str, Any]:
        """The record an endpoint renders ``prompt_variables`` with (its ``prompt.json``)."""
        return {"name": self.name, "version": self.version, "digest": self.digest, "template": asdict(self.template)}


def prompt_registry_name(task_name: str) -> str:
    return f"genops-{task_name}-prompt"


def load_prompt_file(path: str | Path, base: PromptTemplate) -> PromptTemplate:
    """A prompt to try: a ``.txt`` file replaces the system template; a YAML file may set
    ``system``, ``user`` and ``generation: {max_new_tokens, temperature}`` (unset keys keep
    ``base``'s)."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise PromptError(f"{p}: cannot read prompt file: {exc}") from exc
    if p.suffix in (".yaml", ".yml"):
        try:
            cfg = yaml.safe_load(raw) or {}
        except yaml.YAMLError as exc:
            raise PromptError(f"{p}: not valid YAML: {exc}") from exc
        if not isinstance(cfg, dict):
            raise PromptError(f"{p}: expected a mapping with 'system' and/or 'user'")
        unknown = set(cfg) - {"system", "user", "generation"}
        if unknown:
            raise PromptError(f"{p}: unknown key(s) {sorted(unknown)}; allowed: generation, system, user")
        gen = cfg.get("generation") or {}
        template = PromptTemplate(
            system=str(cfg.get("system", base.system)).strip("\n"),
            user=str(cfg.get("user", base.user)).strip("\n"),
            input_field=base.input_field,
            max_new_tokens=int(gen.get("max_new_tokens", base.max_new_tokens)),
            temperature=float(gen.get("temperature", base.temperature)),
        )
    else:
        template = base.with_system(raw.strip("\n"))
    return template.validate(str(p))


def template_diff(old: PromptTemplate, new: PromptTemplate, old_label: str, new_label: str) -> str:
    """Unified diff of two templates' texts."""
    return "".join(difflib.unified_diff(old.text().splitlines(keepends=True), new.text().splitlines(keepends=True),
                                        fromfile=old_label, tofile=new_label, n=2))


def diff_html(diff: str) -> str:
    """The unified diff as coloured HTML lines."""
    from genops_assets.lib.report import render

    lines = [{"text": line, "cls": "add" if line.startswith("+") and not line.startswith("+++")
              else "del" if line.startswith("-") and not line.startswith("---") else "ctx"}
             for line in diff.splitlines()]
    return render("diff.html", lines=lines).rstrip("\n")
