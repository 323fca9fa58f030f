"""What eval_report records beside its gate: ROUGE-L of the task's own text fields, never a
default."""

from __future__ import annotations

import pytest

from genops_assets.lib.eval_report import NOT_COMPUTED, rouge_l_summary
from genops_assets.lib.report import png_markdown


def test_rouge_l_is_read_for_the_tasks_own_text_field():
    metrics = {"rouge_l_answer": 0.42, "mean_field_exact_match": 0.5}
    assert rouge_l_summary(metrics, ("answer",)) == {"rouge_l_answer": 0.42}


def test_a_missing_rouge_l_is_an_error_not_zero():
    with pytest.raises(KeyError, match=r"text field\(s\) \['summary'\]"):
        rouge_l_summary({"rouge_l_answer": 0.42}, ("summary",))


def test_a_task_without_text_fields_says_not_computed():
    (value,) = rouge_l_summary({"mean_field_exact_match": 0.5}, ()).values()
    assert value.startswith(NOT_COMPUTED)


def test_png_markdown_inlines_the_bytes():
    assert png_markdown("chart", b"\x89PNG") == "![chart](data:image/png;base64,iVBORw==)"
