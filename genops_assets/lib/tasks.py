"""A task is a folder of data, not code: examples, prompt templates, output schema, settings.

``load_task`` reads and validates ``tasks/<name>/task.yaml``; every error names the file and
the setting, row or field that is wrong.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from genops_assets.lib.prompts import (
    CONTEXTS_VARIABLE,
    FEW_SHOT_VARIABLE,
    PromptError,
    PromptTemplate,
    template_variables,
)

RAW_SUFFIXES = (".jsonl", ".csv")


class TaskConfigError(ValueError):
    """A task folder, its settings or its templates are malformed."""


class TaskDataError(ValueError):
    """A raw data file cannot be read; the message names the file and row."""


@dataclass(frozen=True)
class Splits:
    golden_fraction: float = 0.12
    validation_fraction: float = 0.08
    few_shot_per_label: int = 2
    few_shot_label_field: str = ""
    near_duplicate_jaccard: float = 0.8


@dataclass(frozen=True)
class ContextFields:
    """Where the examples of a retrieval-augmented task keep their passages.

    ``retrieved``: the passages a retriever returned for the input, shown to the model in
    the ``{contexts}`` slot. ``reference``: the passages that should have been retrieved
    (optional per example), for context precision / recall.
    """

    retrieved: str
    reference: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    """Validated settings of one task folder."""

    name: str
    root: Path
    description: str
    input_field: str
    data_files: tuple[str, ...]
    schema: dict[str, Any]
    system_template: str
    user_template: str
    label_fields: tuple[str, ...]
    text_fields: tuple[str, ...]
    primary_metric: str
    input_length: tuple[int, int]
    text_length: tuple[int, int]
    splits: Splits
    max_new_tokens: int
    template_files: dict[str, str] = field(default_factory=dict)
    contexts: ContextFields | None = None

    @property
    def output_fields(self) -> tuple[str, ...]:
        return tuple(self.schema.get("properties", {}).keys())

    @property
    def prompt(self) -> PromptTemplate:
        """The prompt as written in the task folder (the registry holds its versions)."""
        return PromptTemplate(self.system_template, self.user_template, self.input_field, self.max_new_tokens)

    @property
    def incoming_dir(self) -> Path:
        return self.root / "incoming"

    def allowed_values(self) -> dict[str, list[str]]:
        """Enumerated values per label field, from the JSON schema."""
        props = self.schema.get("properties", {})
        return {f: list(props[f]["enum"]) for f in self.label_fields if "enum" in props.get(f, {})}

    def raw_files(self) -> list[Path]:
        """The task's data files plus every file dropped into ``incoming/``, in a stable order."""
        files = [self.root / f for f in self.data_files]
        if self.incoming_dir.is_dir():
            files += sorted(
                p for p in self.incoming_dir.iterdir() if p.is_file() and p.suffix in RAW_SUFFIXES
            )
        return files


def _require(cfg: dict[str, Any], key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    if key not in cfg:
        raise TaskConfigError(f"{where}: missing required setting '{key}'")
    value = cfg[key]
    if not isinstance(value, kind):
        raise TaskConfigError(
            f"{where}: setting '{key}' must be {getattr(kind, '__name__', kind)}, got {value!r}"
        )
    return value


def load_task(tasks_dir: str | Path, name: str) -> TaskSpec:
    root = Path(tasks_dir) / name
    cfg_path = root / "task.yaml"
    if not cfg_path.is_file():
        available = sorted(p.name for p in Path(tasks_dir).glob("*/task.yaml")) if Path(tasks_dir).is_dir() else []
        raise TaskConfigError(f"task '{name}': {cfg_path} not found (tasks with a task.yaml: {available or 'none'})")
    try:
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TaskConfigError(f"{cfg_path}: not valid YAML: {exc}") from exc
    if not isinstance(cfg, dict):
        raise TaskConfigError(f"{cfg_path}: expected a mapping of settings at top level")

    input_field = _require(cfg, "input_field", str, cfg_path)
    data_files = tuple(_require(cfg, "data_files", list, cfg_path))
    for f in data_files:
        if not (root / f).is_file():
            raise TaskConfigError(f"{cfg_path}: data_files entry '{f}' does not exist")
        if Path(f).suffix not in RAW_SUFFIXES:
            raise TaskConfigError(f"{cfg_path}: data_files entry '{f}' must be one of {RAW_SUFFIXES}")

    schema_path = root / _require(cfg, "schema_file", str, cfg_path)
    try:
        schema = json.loads(schema_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise TaskConfigError(f"{cfg_path}: schema_file '{schema_path.name}' does not exist") from exc
    except json.JSONDecodeError as exc:
        raise TaskConfigError(f"{schema_path}: not valid JSON: {exc}") from exc
    props = schema.get("properties")
    if not isinstance(props, dict) or not props:
        raise TaskConfigError(f"{schema_path}: needs an object schema with 'properties'")

    label_fields = tuple(_require(cfg, "label_fields", list, cfg_path))
    text_fields = tuple(cfg.get("text_fields", []))
    for f in label_fields + text_fields:
        if f not in props:
            raise TaskConfigError(f"{cfg_path}: field '{f}' is not a property of {schema_path.name}")

    contexts = _context_fields(cfg, cfg_path, input_field, tuple(props))

    prompts = _require(cfg, "prompts", dict, cfg_path)
    templates: dict[str, str] = {}
    template_files: dict[str, str] = {}
    for role in ("system", "user"):
        rel = prompts.get(role)
        if not isinstance(rel, str):
            raise TaskConfigError(f"{cfg_path}: prompts.{role} must name a template file")
        path = root / rel
        if not path.is_file():
            raise TaskConfigError(f"{cfg_path}: prompts.{role} file '{rel}' does not exist")
        templates[role] = path.read_text(encoding="utf-8").strip("\n")
        template_files[role] = rel
        allowed = {input_field, FEW_SHOT_VARIABLE} | ({CONTEXTS_VARIABLE} if contexts else set())
        try:
            unknown = template_variables(templates[role], str(path)) - allowed
        except PromptError as exc:
            raise TaskConfigError(str(exc)) from exc
        if unknown:
            raise TaskConfigError(
                f"{path}: unknown template variable(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
            )
    if "{" + input_field + "}" not in templates["user"]:
        raise TaskConfigError(f"{root / template_files['user']}: must contain {{{input_field}}}")
    if contexts and not any(CONTEXTS_VARIABLE in template_variables(t, role) for role, t in templates.items()):
        raise TaskConfigError(f"{root / template_files['user']}: the task has retrieved contexts "
                              f"('{contexts.retrieved}'), so a template must show them with {{{CONTEXTS_VARIABLE}}}")

    def _bounds(key: str, default: tuple[int, int]) -> tuple[int, int]:
        raw = cfg.get(key, {"min": default[0], "max": default[1]})
        try:
            lo, hi = int(raw["min"]), int(raw["max"])
        except (TypeError, KeyError, ValueError) as exc:
            raise TaskConfigError(f"{cfg_path}: '{key}' needs integer min and max") from exc
        if not 0 <= lo < hi:
            raise TaskConfigError(f"{cfg_path}: '{key}' needs 0 <= min < max, got {lo}..{hi}")
        return lo, hi

    split_cfg = cfg.get("splits", {}) or {}
    try:
        splits = Splits(
            golden_fraction=float(split_cfg.get("golden_fraction", 0.12)),
            validation_fraction=float(split_cfg.get("validation_fraction", 0.08)),
            few_shot_per_label=int(split_cfg.get("few_shot_per_label", 2)),
            few_shot_label_field=str(split_cfg.get("few_shot_label_field", label_fields[0] if label_fields else "")),
            near_duplicate_jaccard=float(split_cfg.get("near_duplicate_jaccard", 0.8)),
        )
    except (TypeError, ValueError) as exc:
        raise TaskConfigError(f"{cfg_path}: malformed 'splits': {exc}") from exc
    for key in ("golden_fraction", "validation_fraction", "near_duplicate_jaccard"):
        if not 0 < getattr(splits, key) < 1:
            raise TaskConfigError(f"{cfg_path}: splits.{key} must be between 0 and 1")

    primary = str(cfg.get("primary_metric", "mean_field_exact_match"))
    return TaskSpec(
        name=str(cfg.get("name", name)),
        root=root,
        description=str(cfg.get("description", "")).strip(),
        input_field=input_field,
        data_files=data_files,
        schema=schema,
        system_template=templates["system"],
        user_template=templates["user"],
        label_fields=label_fields,
        text_fields=text_fields,
        primary_metric=primary,
        input_length=_bounds("input_length", (1, 4000)),
        text_length=_bounds("text_length", (1, 1000)),
        splits=splits,
        max_new_tokens=int((cfg.get("generation") or {}).get("max_new_tokens", 128)),
        template_files=template_files,
        contexts=contexts,
    )


_CONTEXT_KEYS = ("retrieved_field", "reference_field")


def _context_fields(cfg: dict[str, Any], where: Path, input_field: str,
                    output_fields: tuple[str, ...]) -> ContextFields | None:
    """The optional ``contexts:`` section: which example fields hold the passages."""
    if "contexts" not in cfg or cfg["contexts"] is None:
        return None
    section = cfg["contexts"]
    if not isinstance(section, dict):
        raise TaskConfigError(f"{where}: 'contexts' must be a mapping with {list(_CONTEXT_KEYS)}, got {section!r}")
    unknown = sorted(set(section) - set(_CONTEXT_KEYS))
    if unknown:
        raise TaskConfigError(f"{where}: unknown key(s) {unknown} in 'contexts'; allowed: {list(_CONTEXT_KEYS)}")
    names: dict[str, str] = {}
    for key in _CONTEXT_KEYS:
        value = section.get(key)
        if value is None and key == "reference_field":
            continue
        if not isinstance(value, str) or not value.strip():
            raise TaskConfigError(f"{where}: contexts.{key} must name an example field, got {value!r}")
        if value == input_field or value in output_fields:
            raise TaskConfigError(f"{where}: contexts.{key} '{value}' is already the input field or an output "
                                  "field; the passages need a field of their own")
        names[key] = value
    if names.get("reference_field") == names["retrieved_field"]:
        raise TaskConfigError(f"{where}: contexts.reference_field and contexts.retrieved_field are both "
                              f"'{names['retrieved_field']}'")
    return ContextFields(names["retrieved_field"], names.get("reference_field"))


@dataclass(frozen=True)
class RawExample:
    source_file: str
    source_row: int
    input_text: str
    output: dict[str, Any]
    contexts: tuple[str, ...] | None = None
    reference_contexts: tuple[str, ...] | None = None


def passages(value: Any, where: str, name: str, from_csv: bool = False) -> tuple[str, ...]:
    """A list of passages as an example carries it; anything else raises ``TaskDataError``
    naming ``where`` (file and row) and the field. A CSV cell holds the list as JSON."""
    if from_csv and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise TaskDataError(f"{where}: field '{name}' must be a JSON list of strings in a CSV cell "
                                f"({exc.msg} at column {exc.colno})") from exc
    if not isinstance(value, list):
        raise TaskDataError(f"{where}: field '{name}' must be a list of strings, got {type(value).__name__}")
    if not value:
        raise TaskDataError(f"{where}: field '{name}' is an empty list; give at least one passage")
    for i, item in enumerate(value, start=1):
        if not isinstance(item, str):
            raise TaskDataError(f"{where}: field '{name}' item {i} must be a string, got {type(item).__name__}")
        if not item.strip():
            raise TaskDataError(f"{where}: field '{name}' item {i} is empty")
    return tuple(value)


def read_raw_file(path: Path, task: TaskSpec) -> Iterator[RawExample]:
    """Yield the examples of one JSONL or CSV file; a malformed row raises ``TaskDataError``.

    Label values are not judged here (a null or unknown label flows on to the data-quality
    checks, which name the row); structure is: the row must parse and carry every field.
    """
    rel = path.relative_to(task.root).as_posix() if path.is_relative_to(task.root) else str(path)
    fields = task.output_fields
    try:
        fh = open(path, encoding="utf-8", newline="")
    except OSError as exc:
        raise TaskDataError(f"{path}: cannot read data file: {exc}") from exc
    with fh:
        if path.suffix == ".jsonl":
            rows: Iterator[tuple[int, Any]] = _jsonl_rows(fh, path)
        elif path.suffix == ".csv":
            rows = _csv_rows(fh, path)
        else:
            raise TaskDataError(f"{path}: unsupported data file type (use {RAW_SUFFIXES})")
        for line_no, row in rows:
            if not isinstance(row, dict):
                raise TaskDataError(f"{path}, row {line_no}: expected an object, got {type(row).__name__}")
            text = row.get(task.input_field)
            if not isinstance(text, str) or not text.strip():
                raise TaskDataError(f"{path}, row {line_no}: field '{task.input_field}' is missing or empty")
            missing = [f for f in fields if f not in row]
            if missing:
                raise TaskDataError(f"{path}, row {line_no}: missing output field(s) {missing}")
            retrieved = reference = None
            if task.contexts is not None:
                where, csv_cell = f"{path}, row {line_no}", path.suffix == ".csv"
                name = task.contexts.retrieved
                if row.get(name) is None:
                    raise TaskDataError(f"{where}: field '{name}' (the retrieved contexts) is missing")
                retrieved = passages(row[name], where, name, csv_cell)
                # Reference passages are optional per example: context precision / recall are
                # computed over the examples that have them.
                ref_name = task.contexts.reference
                if ref_name is not None and row.get(ref_name) is not None:
                    reference = passages(row[ref_name], where, ref_name, csv_cell)
            yield RawExample(rel, line_no, text, {f: row[f] for f in fields}, retrieved, reference)


def _jsonl_rows(fh, path: Path) -> Iterator[tuple[int, Any]]:
    try:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskDataError(f"{path}, row {line_no}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    except UnicodeDecodeError as exc:
        raise TaskDataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _csv_rows(fh, path: Path) -> Iterator[tuple[int, Any]]:
    try:
        reader = csv.DictReader(fh)
        for line_no, row in enumerate(reader, start=2):
            yield line_no, {k: (v if v != "" else None) for k, v in row.items()}
    except (csv.Error, UnicodeDecodeError) as exc:
        raise TaskDataError(f"{path}: unreadable CSV: {exc}") from exc
