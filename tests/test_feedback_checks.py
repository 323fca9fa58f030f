"""The blocking checks of the feedback marts, each passing a clean mart and failing a bad row,
through the rules and validation the asset checks run (genops_assets/defs/datasets/checks.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from genops_assets.defs.datasets.checks import (
    CORRECTION_COLUMNS,
    PREFERENCE_COLUMNS,
    check_result,
    feedback_mart_rules,
)
from genops_assets.lib.tasks import load_task
from genops_assets.lib.validation import validate_mart

REPO = Path(__file__).resolve().parents[1]
GOOD = {"category": "billing", "priority": "low", "product": "mobile_app", "summary": "Customer asks about a charge."}
GOLDEN = pd.DataFrame({"input_text": ["My thermostat keeps clicking on and off every two minutes tonight"]})


@pytest.fixture(scope="module")
def spec():
    return load_task(REPO / "tasks", "support_triage")


def pair(pair_id: str, text: str, chosen: str, rejected: str, split: str = "train") -> dict:
    return {**dict.fromkeys(PREFERENCE_COLUMNS), "pair_id": pair_id, "item_id": "it_" + pair_id,
            "input_text": text, "chosen_json": chosen, "rejected_json": rejected, "split": split,
            "n_ratings": 2, "agreement": 1.0, "source": "live"}


def failed(report) -> dict[str, list[str]]:
    return {f"{o.name}[{o.column}]": o.failing_rows for o in report.outcomes if not o.success}


def test_preference_pairs_check(spec):
    good = json.dumps(GOOD)
    clean = pd.DataFrame([pair("p1", "Where is my parcel, two weeks late", good, "{}"),
                          # a golden input is fine in the held-out split
                          pair("p2", GOLDEN["input_text"][0], good, "{}", split="heldout")])
    result = check_result(validate_mart("preference_pairs", clean, feedback_mart_rules(spec, "preference_pairs",
                                                                                         GOLDEN)))
    assert result.passed, result.description

    bad = pd.DataFrame([pair("p1", "Where is my parcel, two weeks late", good, good),  # chosen == rejected
                        pair("p2", "my thermostat keeps clicking on and off every two minutes tonight!!", good,
                             "{}")])  # a golden input in train
    report = validate_mart("preference_pairs", bad, feedback_mart_rules(spec, "preference_pairs", GOLDEN))
    result = check_result(report)
    assert not result.passed and result.severity.value == "ERROR"
    assert failed(report) == {"expect_column_values_to_be_in_set[identical_answers]": ["p1"],
                              "expect_column_values_to_be_between[golden_overlap_jaccard]": ["p2"]}


def correction(cid: str, output) -> dict:
    return {**dict.fromkeys(CORRECTION_COLUMNS), "correction_id": cid, "item_id": "it_" + cid, "rater": "ana",
            "input_text": "Where is my parcel, two weeks late", "output_json": json.dumps(output)}


def test_human_corrections_check(spec):
    rules = feedback_mart_rules(spec, "human_corrections")
    assert validate_mart("human_corrections", pd.DataFrame([correction("c1", GOOD)]), rules).success
    bad = pd.DataFrame([correction("c1", GOOD), correction("c2", {**GOOD, "category": "not_a_category"}),
                        correction("c3", {"summary": "no labels"})])
    report = validate_mart("human_corrections", bad, rules)
    assert not report.success
    assert failed(report) == {"expect_column_values_to_be_null[output_schema_errors]": ["c2", "c3"]}


def test_feedback_checks_pass_on_empty_marts(spec):
    for mart, cols in (("preference_pairs", PREFERENCE_COLUMNS), ("human_corrections", CORRECTION_COLUMNS)):
        report = validate_mart(mart, pd.DataFrame(columns=list(cols)), feedback_mart_rules(spec, mart, GOLDEN))
        assert report.success, report.summary()
