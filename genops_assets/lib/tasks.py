"""A task is a folder of data, not code: examples, prompt templates, output schema, settings.

``task.yaml`` is read into :class:`TaskSettings` (pydantic: every default is stated there) and
the folder's files are checked against it; :func:`load_task` returns the result as a
:class:`TaskSpec`. Every error names the file and the setting (``splits.golden_fraction``),
row or field that is wrong.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from genops_assets.lib.guardrails.config import (
    GUARDRAILS_FILE,
    GuardrailConfig,
    GuardrailConfigError,
    guardrails_version,
    load_guardrails,
)
from genops_assets.lib.jsonl import iter_jsonl
from genops_assets.lib.output_schema import OutputSchema, OutputSchemaError
from genops_assets.lib.prompts import (
    CONTEXTS_VARIABLE,
    FEW_SHOT_VARIABLE,
    PromptError,
    PromptTemplate,
    template_variables,
)

RAW_SUFFIXES = (".jsonl", ".csv")
# Golden proposals a person accepted (`genops golden accept`): read with the task's data, always
# in the golden set (dbt staging gives them split bucket 0).
GOLDEN_ADDITIONS = "golden_additions.jsonl"


class TaskConfigError(ValueError):
    """A task folder, its settings or its templates are malformed."""


class TaskDataError(ValueError):
    """A raw data file cannot be read; the message names the file and row."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Splits(_Section):
    golden_fraction: float = Field(0.12, gt=0, lt=1)
    validation_fraction: float = Field(0.08, gt=0, lt=1)
    few_shot_per_label: int = Field(2, ge=0)
    few_shot_label_field: str = Field("", description="Empty: the first label field")
    near_duplicate_jaccard: float = Field(0.8, gt=0, lt=1)


class ContextFields(_Section):
    """Where the examples of a retrieval-augmented task keep their passages.

    ``retrieved``: the passages a retriever returned for the input, shown to the model in
    the ``{contexts}`` slot. ``reference``: the passages that should have been retrieved
    (optional per example), for context precision / recall.
    """

    retrieved: str = Field(alias="retrieved_field")
    reference: str | None = Field(None, alias="reference_field")

    @field_validator("retrieved", "reference")
    @classmethod
    def _named(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must name an example field")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> ContextFields:
        if self.reference == self.retrieved:
            raise ValueError(f"reference_field and retrieved_field are both '{self.retrieved}'")
        return self


class Bounds(_Section):
    """An inclusive length range in characters."""

    min: int = Field(ge=0)
    max: int

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if not self.min < self.max:
            raise ValueError(f"needs min < max, got {self.min}..{self.max}")
        return self

    def pair(self) -> tuple[int, int]:
        return self.min, self.max


class PromptFiles(_Section):
    system: str = Field(min_length=1, description="Template file of the system message")
    user: str = Field(min_length=1, description="Template file of the user message")


class Generation(_Section):
    max_new_tokens: int = Field(128, gt=0)
    constrained: bool = Field(True, description="Decode within the output schema (evaluation and serving)")


# Optimized variants the optimization job can build (``optimization.variants``).
VARIANT_NAMES = ("merged", "q8_0", "q4_k_m", "distilled", "distilled_q4_k_m")
DEPLOY_NONE, DEPLOY_FASTEST = "none", "fastest"


class OptimizationSettings(_Section):
    """Which optimized variants are built, the quality floor that fails one, and which is served."""

    variants: tuple[str, ...] = Field(
        ("merged", "q8_0", "q4_k_m", "distilled"), description="Variants the optimization job builds")
    quality_floor_points: float = Field(
        2.0, ge=0, description="A variant whose primary metric is more than this many points (metric x 100) "
                               "below the original's is failed, never deployed")
    deploy: str = Field(DEPLOY_NONE, description="What deployed_variant serves: none | fastest | <variant name>")
    student_layers: int | None = Field(
        None, gt=0, description="Layers the distilled student keeps (null: two thirds of the base's)")
    student_steps: int = Field(200, gt=0, description="Training steps of the student")

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [v for v in value if v not in VARIANT_NAMES]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; known: {list(VARIANT_NAMES)}")
        if len(set(value)) != len(value):
            raise ValueError(f"lists a variant twice: {list(value)}")
        return value

    @model_validator(mode="after")
    def _deployable(self) -> OptimizationSettings:
        if self.deploy not in (DEPLOY_NONE, DEPLOY_FASTEST, *self.variants):
            raise ValueError(f"deploy: must be '{DEPLOY_NONE}', '{DEPLOY_FASTEST}' or one of the variants "
                             f"{list(self.variants)}, got '{self.deploy}'")
        return self


class Feedback(_Section):
    """How people's ratings become data: redundancy, agreement rules, gold questions."""

    ratings_per_item: int = Field(3, ge=1, description="Raters asked per queue item")
    min_item_agreement: float = Field(
        0.66, gt=0, le=1, description="Share of an item's raters that must pick the majority choice")
    min_item_ratings: int = Field(2, ge=1, description="Ratings an item needs before it counts")
    min_gold_accuracy: float = Field(
        0.75, ge=0, le=1, description="Raters below this accuracy on gold questions are excluded")
    min_gold_answered: int = Field(
        2, ge=0, description="Gold questions a rater must answer before their accuracy is judged")
    gold_share: float = Field(0.1, ge=0, lt=1, description="Share of a rater's queue that is gold questions")
    heldout_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of agreed pairs (by hash) held out from preference tuning")
    min_new_pairs: int = Field(
        20, ge=1, description="New agreed train pairs that request a preference-tuning run")


class JudgeThresholds(_Section):
    """What a judge must show before its verdicts may gate anything (judge_certificate)."""

    min_position_consistency: float = Field(0.8, ge=0, le=1)
    min_repeat_stability: float = Field(0.9, ge=0, le=1)
    min_human_kappa: float = Field(0.4, ge=-1, le=1, description="Cohen's kappa with human choices")
    min_balanced_accuracy: float = Field(0.7, ge=0, le=1, description="Balanced accuracy on human choices")
    min_probe_accuracy: float = Field(0.9, ge=0, le=1, description="Accuracy on the objective golden probes")
    max_length_bias: float = Field(
        0.2, ge=0, le=1, description="Largest allowed excess preference for the longer answer")
    min_human_labels: int = Field(30, ge=0, description="Human-labelled pairs needed before certification")
    max_probe_examples: int = Field(40, ge=1, description="Golden examples the objective probe is built from")


class TaskSettings(_Section):
    """What ``task.yaml`` says, with its defaults; files are checked by :func:`load_task`."""

    name: str | None = Field(None, description="Empty: the folder's name")
    description: str = ""
    input_field: str = Field(min_length=1)
    data_files: tuple[str, ...]
    schema_file: str = Field(min_length=1)
    prompts: PromptFiles
    label_fields: tuple[str, ...]
    text_fields: tuple[str, ...] = ()
    contexts: ContextFields | None = None
    primary_metric: str = "mean_field_exact_match"
    input_length: Bounds = Bounds(min=1, max=4000)
    text_length: Bounds = Bounds(min=1, max=1000)
    splits: Splits = Splits()
    generation: Generation = Generation()
    feedback: Feedback = Feedback()
    judge: JudgeThresholds = JudgeThresholds()
    optimization: OptimizationSettings = OptimizationSettings()


@dataclass(frozen=True)
class TaskSpec:
    """A loaded task folder: its settings, output schema (with its validator) and templates."""

    name: str
    root: Path
    description: str
    input_field: str
    data_files: tuple[str, ...]
    output_schema: OutputSchema
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
    constrained: bool = True  # answers decoded within output_schema (generation.constrained)
    contexts: ContextFields | None = None
    feedback: Feedback = field(default_factory=Feedback)
    judge: JudgeThresholds = field(default_factory=JudgeThresholds)
    # ``guardrails.yaml`` (defaults when the folder has none) and its version (a digest)
    guardrails: GuardrailConfig = field(default_factory=GuardrailConfig)
    guardrails_version: str = field(default_factory=lambda: guardrails_version(GuardrailConfig()))
    optimization: OptimizationSettings = field(default_factory=OptimizationSettings)

    @property
    def schema(self) -> dict[str, Any]:
        return self.output_schema.schema

    @property
    def output_fields(self) -> tuple[str, ...]:
        return self.output_schema.fields

    @property
    def prompt(self) -> PromptTemplate:
        """The prompt as written in the task folder (the registry holds its versions)."""
        return PromptTemplate(self.system_template, self.user_template, self.input_field, self.max_new_tokens)

    @property
    def incoming_dir(self) -> Path:
        return self.root / "incoming"

    def raw_files(self) -> list[Path]:
        """The task's data files, its accepted golden additions (when there are any) and every
        file dropped into ``incoming/``, in a stable order."""
        files = [self.root / f for f in self.data_files]
        if (self.root / GOLDEN_ADDITIONS).is_file() and GOLDEN_ADDITIONS not in self.data_files:
            files.append(self.root / GOLDEN_ADDITIONS)
        if self.incoming_dir.is_dir():
            files += sorted(
                p for p in self.incoming_dir.iterdir() if p.is_file() and p.suffix in RAW_SUFFIXES
            )
        return files


def validation_message(exc: ValidationError, where: Path | str) -> str:
    """One line per problem: ``<file>: <setting path>: <what is wrong>``."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in err["loc"])
        msg = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
        lines.append(f"{where}: {loc}: {msg}" if loc else f"{where}: {msg}")
    return "\n".join(lines)


def read_task_settings(cfg_path: Path) -> TaskSettings:
    """``task.yaml`` parsed and typed; a bad value raises naming the file and the setting."""
    try:
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TaskConfigError(f"{cfg_path}: not valid YAML: {exc}") from exc
    return validated(TaskSettings, cfg, cfg_path, TaskConfigError)


def validated(model: type[BaseModel], data: Any, where: Path | str, error: type[ValueError]) -> Any:
    """``data`` (parsed YAML or JSON) as ``model``; else ``error`` naming ``where`` and each setting."""
    if not isinstance(data, dict):
        raise error(f"{where}: expected a mapping of settings at top level")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(validation_message(exc, where)) from exc


def load_task(tasks_dir: str | Path, name: str) -> TaskSpec:
    root = Path(tasks_dir) / name
    cfg_path = root / "task.yaml"
    if not cfg_path.is_file():
        available = sorted(p.name for p in Path(tasks_dir).glob("*/task.yaml")) if Path(tasks_dir).is_dir() else []
        raise TaskConfigError(f"task '{name}': {cfg_path} not found (tasks with a task.yaml: {available or 'none'})")
    cfg = read_task_settings(cfg_path)

    def fail(setting: str, message: str) -> TaskConfigError:
        return TaskConfigError(f"{cfg_path}: {setting}: {message}")

    for i, f in enumerate(cfg.data_files):
        if Path(f).suffix not in RAW_SUFFIXES:
            raise fail(f"data_files.{i}", f"'{f}' must be one of {RAW_SUFFIXES}")
        if not (root / f).is_file():
            raise fail(f"data_files.{i}", f"'{f}' does not exist")

    schema_path = root / cfg.schema_file
    try:
        raw_schema = json.loads(schema_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise fail("schema_file", f"'{cfg.schema_file}' does not exist") from exc
    except json.JSONDecodeError as exc:
        raise TaskConfigError(f"{schema_path}: not valid JSON: {exc}") from exc
    try:
        output_schema = OutputSchema(raw_schema, str(schema_path))
    except OutputSchemaError as exc:
        raise TaskConfigError(str(exc)) from exc
    props = output_schema.fields

    for key in ("label_fields", "text_fields"):
        for f in getattr(cfg, key):
            if f not in props:
                raise fail(key, f"field '{f}' is not a property of {schema_path.name}")
    contexts = cfg.contexts
    if contexts is not None:
        for key, value in (("retrieved_field", contexts.retrieved), ("reference_field", contexts.reference)):
            if value is not None and (value == cfg.input_field or value in props):
                raise fail(f"contexts.{key}", f"'{value}' is already the input field or an output field; "
                           "the passages need a field of their own")

    templates: dict[str, str] = {}
    template_files = {"system": cfg.prompts.system, "user": cfg.prompts.user}
    allowed = {cfg.input_field, FEW_SHOT_VARIABLE} | ({CONTEXTS_VARIABLE} if contexts else set())
    for role, rel in template_files.items():
        path = root / rel
        if not path.is_file():
            raise fail(f"prompts.{role}", f"file '{rel}' does not exist")
        templates[role] = path.read_text(encoding="utf-8").strip("\n")
        try:
            unknown = template_variables(templates[role], str(path)) - allowed
        except PromptError as exc:
            raise TaskConfigError(str(exc)) from exc
        if unknown:
            raise TaskConfigError(
                f"{path}: unknown template variable(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
            )
    if "{" + cfg.input_field + "}" not in templates["user"]:
        raise TaskConfigError(f"{root / template_files['user']}: must contain {{{cfg.input_field}}}")
    if contexts and not any(CONTEXTS_VARIABLE in template_variables(t, role) for role, t in templates.items()):
        raise TaskConfigError(f"{root / template_files['user']}: the task has retrieved contexts "
                              f"('{contexts.retrieved}'), so a template must show them with {{{CONTEXTS_VARIABLE}}}")

    try:
        guardrails = load_guardrails(root / GUARDRAILS_FILE)
    except GuardrailConfigError as exc:
        raise TaskConfigError(str(exc)) from exc

    splits = cfg.splits
    if not splits.few_shot_label_field and cfg.label_fields:
        splits = splits.model_copy(update={"few_shot_label_field": cfg.label_fields[0]})
    return TaskSpec(
        name=check_task_name(cfg.name or name, str(cfg_path)),
        root=root,
        description=cfg.description.strip(),
        input_field=cfg.input_field,
        data_files=cfg.data_files,
        output_schema=output_schema,
        system_template=templates["system"],
        user_template=templates["user"],
        label_fields=cfg.label_fields,
        text_fields=cfg.text_fields,
        primary_metric=cfg.primary_metric,
        input_length=cfg.input_length.pair(),
        text_length=cfg.text_length.pair(),
        splits=splits,
        max_new_tokens=cfg.generation.max_new_tokens,
        template_files=template_files,
        constrained=cfg.generation.constrained,
        contexts=contexts,
        feedback=cfg.feedback,
        judge=cfg.judge,
        guardrails=guardrails,
        guardrails_version=guardrails_version(guardrails),
        optimization=cfg.optimization,
    )


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
    if path.suffix not in RAW_SUFFIXES:
        raise TaskDataError(f"{path}: unsupported data file type (use {RAW_SUFFIXES})")
    try:
        path.open("rb").close()
    except OSError as exc:
        raise TaskDataError(f"{path}: cannot read data file: {exc}") from exc
    rows = iter_jsonl(path, error=TaskDataError) if path.suffix == ".jsonl" else _csv_rows(path)
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


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            for line_no, row in enumerate(csv.DictReader(fh), start=2):
                yield line_no, {k: (v if v != "" else None) for k, v in row.items()}
    except (csv.Error, UnicodeDecodeError) as exc:
        raise TaskDataError(f"{path}: unreadable CSV: {exc}") from exc


# A task name becomes an asset key prefix, a step name prefix and part of schema names.
TASK_NAME_PATTERN = r"[A-Za-z][A-Za-z0-9_]*"
# Steps shared by every task keep their bare names in run config.
SHARED_STEPS = frozenset({"base_model", "request_log", "resource_usage"})


def check_task_name(name: str, where: str) -> str:
    if not re.fullmatch(TASK_NAME_PATTERN, name):
        raise TaskConfigError(f"{where}: task name '{name}' must match {TASK_NAME_PATTERN} (it prefixes asset "
                              "keys, job names and warehouse schemas)")
    return name


@dataclass(frozen=True)
class TaskRef:
    """One task folder as the graph binds it: ``name`` (the declared task name, which keys its
    assets) and where its folder is. ``load`` reads the folder afresh, so a run sees the data
    and templates as they are when it starts."""

    name: str
    tasks_dir: str
    folder: str = ""

    @property
    def root(self) -> Path:
        return Path(self.tasks_dir) / (self.folder or self.name)

    def load(self) -> TaskSpec:
        spec = load_task(self.tasks_dir, self.folder or self.name)
        if spec.name != self.name:
            raise TaskConfigError(f"{self.root / 'task.yaml'}: the task is now named '{spec.name}', it was loaded "
                                  f"as '{self.name}'; reload the code location")
        return spec

    def step(self, name: str) -> str:
        """The step (op) name of this task's asset ``name``."""
        return name if name in SHARED_STEPS else f"{self.name}__{name}"


def task_run_config(task: str, run_config: dict[str, Any]) -> dict[str, Any]:
    """A run config written with bare step names (``eval_report``) for one task's job, whose
    steps are named ``<task>__eval_report``; shared steps and names already prefixed stay."""
    ref = TaskRef(task, "")
    ops = run_config.get("ops")
    if not ops:
        return dict(run_config)
    return {**run_config, "ops": {k if k.startswith(f"{task}__") else ref.step(k): v for k, v in ops.items()}}
