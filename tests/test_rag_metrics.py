"""Non-LLM context precision and recall (string similarity) on hand-checked cases."""

from __future__ import annotations

import pytest

from genops_assets.lib.rag_metrics import context_metrics

PARIS = "Paris is the capital and largest city of France."
BANANA = "Bananas are yellow when they are ripe."
TIDE = "Tides are caused by the gravity of the moon."


def test_relevant_passage_first_is_full_precision_and_recall():
    assert context_metrics([PARIS, BANANA], [PARIS]) == pytest.approx(
        {"context_precision": 1.0, "context_recall": 1.0})


def test_relevant_passage_second_halves_average_precision():
    # verdicts [0, 1]: AP = (1/2 * 1) / 1
    assert context_metrics([BANANA, PARIS], [PARIS])["context_precision"] == pytest.approx(0.5)


def test_missing_reference_passage_lowers_recall():
    m = context_metrics([PARIS], [PARIS, TIDE])
    assert m["context_recall"] == pytest.approx(0.5) and m["context_precision"] == pytest.approx(1.0)


def test_similarity_of_one_half_is_relevant_for_precision_but_not_retrieved_for_recall():
    # "abcd" vs "abxy": 2 edits over 4 characters, similarity 0.5; precision needs >= 0.5, recall > 0.5
    assert context_metrics(["abxy"], ["abcd"]) == pytest.approx({"context_precision": 1.0, "context_recall": 0.0})
    assert context_metrics(["abcx"], ["abcd"]) == pytest.approx({"context_precision": 1.0, "context_recall": 1.0})
    assert context_metrics(["wxyz"], ["abcd"]) == pytest.approx({"context_precision": 0.0, "context_recall": 0.0})


def test_empty_contexts_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        context_metrics([], [PARIS])
