"""Reports from templates: one context feeds the Markdown and the HTML; HTML escapes every value."""

from __future__ import annotations

from genops_assets.lib.prompts import diff_html
from genops_assets.lib.report import prompt_comparison_section, rag_section, write_eval_report, write_sxs_report

MODELS = {"base": {"valid_json_rate": 0.5, "mean_field_exact_match": 0.25},
          "<candidate>": {"valid_json_rate": 1.0, "mean_field_exact_match": 0.75}}
SAMPLE = {"example_id": "ex&1", "model": "<candidate>", "input": "<script>alert(1)</script>",
          "prediction": '{"category": "<b>billing</b>"}', "valid_json": True}


def test_eval_report_markdown_keeps_text_and_html_escapes_it(tmp_path):
    section = prompt_comparison_section("v1", "v2", "--- v1\n+++ v2\n-old <i>\n+new & better\n",
                                        [("valid_json_rate", 0.5, 1.0)], None, "valid_json_rate")
    paths = write_eval_report(tmp_path, "Task <x>", MODELS, ["valid_json_rate", "mean_field_exact_match"],
                              {"passed": False, "reason": "delta < margin"}, [SAMPLE], [section])
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    assert md.startswith("# Task <x>\n\n**Promotion gate: FAILED** - delta < margin\n")
    assert "| metric | base | <candidate> |\n|---|---|---|\n| valid_json_rate | 0.500 | 1.000 |" in md
    assert '- `ex&1` **<candidate>**: `{"category": "<b>billing</b>"}`' in md
    assert "## Prompt comparison: v2 vs v1" in md and "| valid_json_rate | 0.5000 | 1.0000 | +0.5000 |" in md
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<title>Task &lt;x&gt;</title>" in page and "<th>&lt;candidate&gt;</th>" in page
    assert '<p class="failed"><b>Promotion gate: FAILED</b> - delta &lt; margin</p>' in page
    # The section's HTML is inserted as HTML, its own text escaped once.
    assert '<div class="del">-old &lt;i&gt;</div>' in page and '<div class="add">+new &amp; better</div>' in page
    assert "<td>yes</td>" in page


def test_diff_html_classes_and_empty_lines():
    assert diff_html("--- a\n+++ b\n-x\n+y\n\n z") == (
        '<pre class="diff"><div class="ctx">--- a</div><div class="ctx">+++ b</div><div class="del">-x</div>'
        '<div class="add">+y</div><div class="ctx">&nbsp;</div><div class="ctx"> z</div></pre>')


def test_rag_section_lists_failures_up_to_the_limit():
    judged = {"base": {"faithfulness": {"n": 2, "estimate": 0.5, "low": 0.25, "high": 0.75, "failures": 3}}}
    retrieval = {"context_recall": {"n": 1, "estimate": 1.0, "low": 1.0, "high": 1.0, "without_reference": 2}}
    failures = {"base": [{"example_id": f"e{i}", "metric": "faithfulness", "error": "timeout <60 s>"}
                         for i in range(3)]}
    title, md, page = rag_section(judged, retrieval, failures, {"faithfulness": "groundedness"}, max_failures=2)
    assert title == "Retrieval-augmented generation"
    assert "; 2 example(s) without reference passages |" in md
    assert "Failed judge calls (3):" in md and "- base `e1` faithfulness: timeout <60 s>" in md and "`e2`" not in md
    assert "<h3>Failed judge calls (3)</h3>" in page and page.count("timeout &lt;60 s&gt;") == 2


def test_sxs_report_says_kappa_was_not_computed(tmp_path):
    summary = {"examples": 2, "judged_pairs": 2, "pairwise_rubric": "pairwise_quality",
               "judge_human": {"n": 2, "accuracy": 1.0, "cohen_kappa": None}}
    rows = [{"example_id": "1", "input": "<q>", "reference": "", "candidate": "a", "baseline": "b", "outcome": "win",
             "consistent": True, "verdict_candidate_first": "A", "verdict_candidate_second": "B"}]
    page = write_sxs_report(tmp_path, "sxs", "cand", "base", summary, rows, {"calls": 4})["html"].read_text()
    assert "accuracy 1.000, kappa not computed (n=2)" in page
    assert '<tr class="row" data-outcome="win" data-consistent="true"><td>1</td><td><pre>&lt;q&gt;</pre>' in page
