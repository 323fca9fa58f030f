"""Great Expectations (1.x) validation of a mart, returning the failing rows by id.

Runs on an ephemeral GX context over a pandas frame of the mart: no GX project files are
needed and nothing is written. Each row's ``output_json`` is judged by the task's output-schema
validator into an ``output_schema_errors`` column (null when the row conforms), and text fields
are parsed out into ``label__<field>`` columns for their length bounds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from genops_assets.lib.output_schema import OutputSchema

MAX_FAILING_ROWS = 50
SCHEMA_ERRORS = "output_schema_errors"
IDENTICAL = "identical_answers"
_WS = re.compile(r"[\t\n\f\r ]+")
_WORD = re.compile(r"[0-9a-z]+")


def normalise_text(text: str) -> str:
    """Lower case, whitespace runs collapsed, trimmed (the dbt ``normalise_text`` macro)."""
    return _WS.sub(" ", text.lower()).strip(" ")


def word_set(normalised: str) -> frozenset[str]:
    """Distinct word tokens of a normalised text (the dbt ``word_set`` macro)."""
    return frozenset(_WORD.findall(normalised))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


@dataclass(frozen=True)
class MartRules:
    required_columns: Sequence[str]
    non_null_columns: Sequence[str]
    unique_column: str
    input_column: str
    input_length: tuple[int, int] | None
    output_schema: OutputSchema
    text_length: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    forbidden_hashes: frozenset[str] = frozenset()
    forbidden_texts: Sequence[str] = ()
    near_duplicate_jaccard: float = 0.8
    json_column: str = "output_json"
    hash_column: str = "content_hash"
    # False: ``json_column`` is not judged by the output schema (a preference pair's rejected answer
    # may be invalid on purpose).
    check_output_schema: bool = True
    # Two columns that must differ on every row (a preference pair's chosen and rejected answers).
    distinct_columns: tuple[str, str] | None = None
    # (column, value): only rows with that value must stay away from the golden set (the
    # ``train`` split of preference pairs); other rows get overlap 0.
    overlap_only_where: tuple[str, Any] | None = None


@dataclass(frozen=True)
class ExpectationOutcome:
    name: str
    column: str | None
    success: bool
    failing_count: int
    failing_rows: list[Any]
    details: dict[str, Any]


@dataclass(frozen=True)
class ValidationReport:
    mart: str
    success: bool
    row_count: int
    outcomes: list[ExpectationOutcome]

    def summary(self) -> str:
        failed = [o for o in self.outcomes if not o.success]
        if not failed:
            return f"{self.mart}: {len(self.outcomes)} expectations passed on {self.row_count} rows"
        parts = [
            f"{o.name}" + (f"[{o.column}]" if o.column else "") + f" ({o.failing_count} rows: "
            + ", ".join(str(r) for r in o.failing_rows[:5]) + ("..." if o.failing_count > 5 else "") + ")"
            for o in failed
        ]
        return (f"{self.mart}: {len(failed)}/{len(self.outcomes)} expectations failed on {self.row_count} rows: "
                + "; ".join(parts))


def _label_frame(df, rules: MartRules):
    """The mart plus its schema errors, a column per text field of ``output_json``, the overlap score."""
    import pandas as pd

    out = df.copy()
    parsed: list[dict[str, Any]] = []
    raws = out[rules.json_column].tolist() if rules.json_column in out else [None] * len(out)
    for raw in raws:
        try:
            obj = json.loads(raw) if isinstance(raw, str) else None
        except json.JSONDecodeError:
            obj = None
        parsed.append(obj if isinstance(obj, dict) else {})
    errors = ["; ".join(map(str, rules.output_schema.errors(p))) or None for p in parsed]
    out[SCHEMA_ERRORS] = pd.Series(errors, index=out.index, dtype="object")
    for f in rules.text_length:
        out[f"label__{f}"] = pd.Series([p.get(f) for p in parsed], index=out.index, dtype="object")
    if rules.forbidden_texts and rules.input_column in out:
        golden = [word_set(t) for t in rules.forbidden_texts]
        where = rules.overlap_only_where
        checked = ([v == where[1] for v in out[where[0]].tolist()] if where and where[0] in out
                   else [True] * len(out))
        scores = []
        for text, check in zip(out[rules.input_column].tolist(), checked, strict=True):
            words = word_set(normalise_text(text or ""))
            scores.append(max((jaccard(words, g) for g in golden), default=0.0) if check else 0.0)
        out["golden_overlap_jaccard"] = scores
    if rules.distinct_columns and all(c in out for c in rules.distinct_columns):
        a, b = rules.distinct_columns
        out[IDENTICAL] = [x == y for x, y in zip(out[a].tolist(), out[b].tolist(), strict=True)]
    return out


def _expectations(rules: MartRules, columns: Sequence[str]):
    import great_expectations.expectations as gxe

    exps = [gxe.ExpectColumnToExist(column=c) for c in rules.required_columns]
    if any(c not in columns for c in rules.required_columns):
        return exps  # the rest would only error on the missing columns
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in rules.non_null_columns]
    exps.append(gxe.ExpectColumnValuesToBeUnique(column=rules.unique_column))
    if rules.input_length is not None:
        lo, hi = rules.input_length
        exps.append(gxe.ExpectColumnValueLengthsToBeBetween(column=rules.input_column, min_value=lo, max_value=hi))
    if rules.check_output_schema:
        exps.append(gxe.ExpectColumnValuesToBeNull(column=SCHEMA_ERRORS))
    if rules.distinct_columns:
        exps.append(gxe.ExpectColumnValuesToBeInSet(column=IDENTICAL, value_set=[False]))
    for f, (lo, hi) in rules.text_length.items():
        exps.append(gxe.ExpectColumnValuesToNotBeNull(column=f"label__{f}"))
        exps.append(gxe.ExpectColumnValueLengthsToBeBetween(column=f"label__{f}", min_value=lo, max_value=hi))
    if rules.forbidden_hashes:
        exps.append(gxe.ExpectColumnValuesToNotBeInSet(column=rules.hash_column,
                                                       value_set=sorted(rules.forbidden_hashes)))
    if rules.forbidden_texts:
        exps.append(gxe.ExpectColumnValuesToBeBetween(column="golden_overlap_jaccard", min_value=0.0,
                                                      max_value=rules.near_duplicate_jaccard, strict_max=True))
    return exps


def validate_mart(name: str, df, rules: MartRules) -> ValidationReport:
    """Validate one mart with Great Expectations; failing rows are named by ``rules.unique_column``."""
    frame = _label_frame(df, rules)
    return run_suite(name, frame, _expectations(rules, list(frame.columns)),
                     rules.unique_column if rules.unique_column in frame.columns else None)


def run_suite(name: str, frame, expectations: list, id_col: str | None) -> ValidationReport:
    """Run ``expectations`` on a pandas frame in an ephemeral GX context; failing rows are named
    by ``id_col`` (else by index)."""
    import os

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    try:  # per-metric progress bars flood the Dagster log
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    except (ImportError, AttributeError, TypeError):
        pass
    source = context.data_sources.add_pandas(name=f"genops_{name}")
    asset = source.add_dataframe_asset(name=name)
    batch = asset.add_batch_definition_whole_dataframe(f"{name}_whole").get_batch(
        batch_parameters={"dataframe": frame}
    )
    result_format: dict[str, Any] = {"result_format": "COMPLETE"}
    if id_col:
        result_format["unexpected_index_column_names"] = [id_col]
    suite = gx.ExpectationSuite(name=f"genops_{name}", expectations=expectations)
    suite = context.suites.add(suite)
    result = batch.validate(suite, result_format=result_format)

    outcomes: list[ExpectationOutcome] = []
    for r in result.results:
        cfg = r.expectation_config
        column = cfg.kwargs.get("column")
        res = r.result or {}
        rows: list[Any] = []
        for item in res.get("unexpected_index_list") or []:
            rows.append(item.get(id_col) if isinstance(item, dict) and id_col else item)
        count = int(res.get("unexpected_count") or len(rows) or (0 if r.success else 1))
        details: dict[str, Any] = {}
        if res.get("partial_unexpected_list"):
            details["unexpected_values"] = [_plain(v) for v in res["partial_unexpected_list"][:10]]
        if r.exception_info and r.exception_info.get("raised_exception"):
            details["exception"] = str(r.exception_info.get("exception_message"))[:500]
        outcomes.append(ExpectationOutcome(
            name=cfg.type, column=column, success=bool(r.success), failing_count=count,
            failing_rows=sorted({str(x) for x in rows})[:MAX_FAILING_ROWS], details=details,
        ))
    return ValidationReport(mart=name, success=bool(result.success), row_count=len(frame), outcomes=outcomes)


def _plain(v: Any) -> Any:
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)
