"""Great Expectations validation of a mart: what passes, and how failures name their rows."""

from __future__ import annotations

import json

import pandas as pd

from genops_assets.lib.output_schema import OutputSchema
from genops_assets.lib.validation import MartRules, jaccard, normalise_text, validate_mart, word_set

COLS = ["example_id", "content_hash", "input_text", "output_json"]
SCHEMA = OutputSchema({"type": "object", "required": ["category", "summary"], "additionalProperties": False,
                       "properties": {"category": {"type": "string", "enum": ["billing", "shipping"]},
                                      "summary": {"type": "string"}}})


def _row(i: str, text: str, category="billing", summary="Customer asks about a charge.", h=None):
    return (i, h or f"h{i}", text, json.dumps({"category": category, "summary": summary}))


def _rules(**kw) -> MartRules:
    base = dict(required_columns=COLS, non_null_columns=COLS, unique_column="example_id", input_column="input_text",
                input_length=(10, 200), output_schema=SCHEMA,
                text_length={"summary": (10, 200)})
    return MartRules(**{**base, **kw})


def _failed(report) -> dict[str, list[str]]:
    return {f"{o.name}[{o.column}]": o.failing_rows for o in report.outcomes if not o.success}


def _outcome(report, name: str, column: str):
    return next(o for o in report.outcomes if (o.name, o.column) == (name, column))


def test_clean_mart_passes():
    df = pd.DataFrame([_row("a", "I was charged twice this month"), _row("b", "My parcel is late by a week",
                                                                         "shipping")], columns=COLS)
    report = validate_mart("m", df, _rules())
    assert report.success and report.row_count == 2
    assert "passed" in report.summary()


def test_each_failure_names_its_rows():
    df = pd.DataFrame([
        _row("a", "I was charged twice this month"),
        _row("a", "Where is the parcel I ordered in May", "shipping"),
        _row("c", "short"),
        _row("d", "The app crashed when I opened it", category="crash"),
        _row("e", "Please send me the invoice for March", category=None),
        _row("f", "Refund for the broken doorbell please", summary="Short."),
        _row("g", "My camera is broken today please help", h="golden-hash"),
        _row("h", "my  CAMERA is broken today, please help!!"),
    ], columns=COLS)
    rules = _rules(forbidden_hashes=frozenset({"golden-hash"}),
                   forbidden_texts=[normalise_text("My camera is broken today please help")])
    report = validate_mart("m", df, rules)
    failed = _failed(report)
    assert failed["expect_column_values_to_be_unique[example_id]"] == ["a"]
    assert failed["expect_column_value_lengths_to_be_between[input_text]"] == ["c"]
    # an unknown label and a null one break the task's output schema, and say which field
    assert failed["expect_column_values_to_be_null[output_schema_errors]"] == ["d", "e"]
    errors = _outcome(report, "expect_column_values_to_be_null", "output_schema_errors").details["unexpected_values"]
    assert sorted(errors) == ["category: 'crash' is not one of ['billing', 'shipping']",
                              ("category: None is not of type 'string'; "
                               "category: None is not one of ['billing', 'shipping']")]
    assert failed["expect_column_value_lengths_to_be_between[label__summary]"] == ["f"]
    assert failed["expect_column_values_to_not_be_in_set[content_hash]"] == ["g"]
    assert failed["expect_column_values_to_be_between[golden_overlap_jaccard]"] == ["g", "h"]


def test_schema_errors_name_missing_and_unknown_fields():
    df = pd.DataFrame([("a", "ha", "I was charged twice this month", json.dumps({"category": "billing"})),
                       ("b", "hb", "My parcel is late by a week",
                        json.dumps({"category": "shipping", "summary": "Late parcel.", "mood": "angry"}))],
                      columns=COLS)
    report = validate_mart("m", df, _rules(text_length={}))
    assert _failed(report) == {"expect_column_values_to_be_null[output_schema_errors]": ["a", "b"]}
    errors = _outcome(report, "expect_column_values_to_be_null", "output_schema_errors").details["unexpected_values"]
    assert sorted(errors) == ["'summary' is a required property",
                              "Additional properties are not allowed ('mood' was unexpected)"]


def test_missing_column_is_reported_not_crashed():
    df = pd.DataFrame([("a", "x" * 20)], columns=["example_id", "input_text"])
    report = validate_mart("m", df, _rules())
    assert not report.success
    assert {o.column for o in report.outcomes if not o.success} == {"content_hash", "output_json"}
    assert "content_hash" in report.summary()


def test_text_helpers():
    assert normalise_text("  Hello\t\nWORLD  ") == "hello world"
    assert jaccard(word_set("a b c"), word_set("a b d")) == 0.5
