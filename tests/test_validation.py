"""Great Expectations validation of a mart: what passes, and how failures name their rows."""

from __future__ import annotations

import json

import pandas as pd

from genops_assets.lib.validation import MartRules, jaccard, normalise_text, validate_mart, word_set

COLS = ["example_id", "content_hash", "input_text", "output_json"]


def _row(i: str, text: str, category="billing", summary="Customer asks about a charge.", h=None):
    return (i, h or f"h{i}", text, json.dumps({"category": category, "summary": summary}))


def _rules(**kw) -> MartRules:
    base = dict(required_columns=COLS, non_null_columns=COLS, unique_column="example_id", input_column="input_text",
                input_length=(10, 200), label_allowed={"category": ["billing", "shipping"]},
                text_length={"summary": (10, 200)})
    return MartRules(**{**base, **kw})


def _failed(report) -> dict[str, list[str]]:
    return {f"{o.name}[{o.column}]": o.failing_rows for o in report.outcomes if not o.success}


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
    failed = _failed(validate_mart("m", df, rules))
    assert failed["expect_column_values_to_be_unique[example_id]"] == ["a"]
    assert failed["expect_column_value_lengths_to_be_between[input_text]"] == ["c"]
    assert failed["expect_column_values_to_be_in_set[label__category]"] == ["d"]
    assert failed["expect_column_values_to_not_be_null[label__category]"] == ["e"]
    assert failed["expect_column_value_lengths_to_be_between[label__summary]"] == ["f"]
    assert failed["expect_column_values_to_not_be_in_set[content_hash]"] == ["g"]
    assert failed["expect_column_values_to_be_between[golden_overlap_jaccard]"] == ["g", "h"]


def test_missing_column_is_reported_not_crashed():
    df = pd.DataFrame([("a", "x" * 20)], columns=["example_id", "input_text"])
    report = validate_mart("m", df, _rules())
    assert not report.success
    assert {o.column for o in report.outcomes if not o.success} == {"content_hash", "output_json"}
    assert "content_hash" in report.summary()


def test_text_helpers():
    assert normalise_text("  Hello\t\nWORLD  ") == "hello world"
    assert jaccard(word_set("a b c"), word_set("a b d")) == 0.5
