"""Metrics of tasks whose examples carry retrieved contexts (retrieval-augmented answers).

* Retrieval, without an LLM: context precision (are the retrieved passages relevant, relevant
  ones ranked first) and context recall (were the reference passages retrieved), as ragas
  defines its non-LLM versions. Two passages match by string similarity, 1 - the normalized
  Levenshtein distance (rapidfuzz): a retrieved passage is relevant when its best similarity
  to a reference passage is at least 0.5, and it is average precision over the ranking; a
  reference passage counts as retrieved when its best similarity to a retrieved one is above
  0.5. They depend on the passages the examples carry, not on the model: one value for every
  model evaluated, over the examples that have reference passages.
* Answers, through the judge (choice mode): faithfulness with the ``groundedness`` rubric,
  the answer judged against the retrieved passages, and answer relevancy with the
  ``answer_relevancy`` rubric, the answer judged against the question alone. A verdict's
  expected score on the rubric's scale is mapped linearly onto [0, 1] (lowest choice 0,
  highest 1), the range of ragas' own scores. A judge call that fails is a recorded
  per-row failure and the mean is over the judged rows; nothing is scored by default.

Every mean comes with a 95% percentile-bootstrap interval over the examples.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from genops_assets.lib.evaluation import EvalExample, ModelEval
from genops_assets.lib.judging import ChatJudge, Failure, Rubric, expected_score
from genops_assets.lib.prompts import format_contexts
from genops_assets.lib.stats import bootstrap_ci

FAITHFULNESS_RUBRIC = "groundedness"
RELEVANCY_RUBRIC = "answer_relevancy"
RETRIEVAL_METRICS = ("context_precision", "context_recall")
JUDGED_METRICS = ("faithfulness", "answer_relevancy")


SIMILARITY_THRESHOLD = 0.5


def _best_similarity(passage: str, others: Sequence[str]) -> float:
    from rapidfuzz.distance import Levenshtein

    return max(1.0 - Levenshtein.normalized_distance(other, passage) for other in others)


def context_metrics(retrieved: Sequence[str], reference: Sequence[str]) -> dict[str, float]:
    """Context precision (average precision of the relevant retrieved passages) and context
    recall (share of reference passages retrieved) of one example."""
    if not retrieved or not reference:
        raise ValueError("context metrics need at least one retrieved and one reference context")
    relevant = [_best_similarity(rc, reference) >= SIMILARITY_THRESHOLD for rc in retrieved]
    hits = [sum(relevant[: i + 1]) / (i + 1) for i, rel in enumerate(relevant) if rel]
    precision = sum(hits) / len(hits) if hits else 0.0
    recall = sum(_best_similarity(ref, retrieved) > SIMILARITY_THRESHOLD for ref in reference) / len(reference)
    return {"context_precision": float(precision), "context_recall": float(recall)}


@dataclass(frozen=True)
class RagRow:
    """One example as the RAG metrics see it; ``response`` is a model's answer."""

    example_id: str
    question: str
    contexts: tuple[str, ...]
    reference_contexts: tuple[str, ...] = ()
    reference: Any = None
    response: str = ""


@dataclass
class RagResult:
    """Per-row scores, a summary per metric (interval, ``n`` scored, ``failures``), failed rows."""

    rows: list[dict[str, Any]]
    summary: dict[str, dict[str, Any]]
    failures: list[dict[str, str]] = field(default_factory=list)


def _summary(values: Sequence[float], failures: int, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(values), "failures": failures}
    if values:
        out.update(bootstrap_ci(values, seed=seed).as_dict())
    return out


def retrieval_metrics(rows: Sequence[RagRow], seed: int = 0) -> RagResult:
    """Context precision and recall of every row with reference passages (others are skipped:
    without a reference there is nothing to compare the retrieval with)."""
    scored = [r for r in rows if r.reference_contexts]
    out_rows = [{"example_id": r.example_id, **context_metrics(r.contexts, r.reference_contexts)} for r in scored]
    summary = {m: _summary([row[m] for row in out_rows], 0, seed) for m in RETRIEVAL_METRICS}
    for m in RETRIEVAL_METRICS:
        summary[m]["without_reference"] = len(rows) - len(scored)
    return RagResult(out_rows, summary)


def unit_score(verdict, rubric: Rubric) -> float:
    """The verdict's expected score on the rubric's numeric scale, mapped onto [0, 1]."""
    scale = sorted(int(c) for c in rubric.choices)
    if scale[0] == scale[-1]:
        raise ValueError(f"rubric '{rubric.name}' has a one-point scale {rubric.choices}")
    return (expected_score(verdict) - scale[0]) / (scale[-1] - scale[0])


def judged_metrics(judge: ChatJudge, faithfulness: Rubric, relevancy: Rubric, rows: Sequence[RagRow],
                   seed: int = 0, log: Callable[[str], None] = print) -> RagResult:
    """Faithfulness and answer relevancy of each row's ``response``, two judge calls a row
    (cached by content: an unchanged re-run makes none)."""
    for rubric in (faithfulness, relevancy):
        if rubric.kind != "pointwise":
            raise ValueError(f"rubric '{rubric.name}' ({rubric.source}) is {rubric.kind}, not pointwise")
    if not rows:
        raise ValueError("judged RAG metrics need at least one example")
    items = []
    for r in rows:
        reference = r.reference if isinstance(r.reference, str) else json.dumps(r.reference, ensure_ascii=False)
        items.append((faithfulness.render(input=r.question, reference=format_contexts(r.contexts),
                                          response=r.response), faithfulness.choices, faithfulness.version))
        items.append((relevancy.render(input=r.question, reference=reference or "(none)", response=r.response),
                      relevancy.choices, relevancy.version))

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 4) == 0:
            log(f"judging faithfulness / answer relevancy: {done}/{total} calls")

    verdicts = judge.choose_many(items, on_done=progress)
    out_rows: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    values: dict[str, list[float]] = {m: [] for m in JUDGED_METRICS}
    for i, r in enumerate(rows):
        row: dict[str, Any] = {"example_id": r.example_id}
        for metric, rubric, verdict in zip(JUDGED_METRICS, (faithfulness, relevancy), verdicts[2 * i: 2 * i + 2],
                                           strict=True):
            if isinstance(verdict, Failure):
                failures.append({"example_id": r.example_id, "metric": metric, "error": verdict.error})
                row[metric] = None
                row[f"{metric}_error"] = verdict.error
            else:
                row[metric] = unit_score(verdict, rubric)
                values[metric].append(row[metric])
        out_rows.append(row)
    summary = {m: _summary(values[m], sum(1 for f in failures if f["metric"] == m), seed) for m in JUDGED_METRICS}
    return RagResult(out_rows, summary, failures)


def evaluate_rag(judge: ChatJudge | None, rubrics: Mapping[str, Rubric], examples: Sequence[EvalExample],
                 evals: Mapping[str, ModelEval], seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The RAG metrics of an evaluation: retrieval once, and, with a judge, faithfulness and
    answer relevancy of every evaluated model's answers. Each model's means go into its
    ``metrics`` and ``intervals``, its per-row scores (or errors) into its ``predictions``.
    ``judge=None`` computes the retrieval metrics only."""
    rows = [RagRow(e.example_id, e.input_text, e.contexts, e.reference_contexts, e.reference) for e in examples]
    bare = [r.example_id for r in rows if not r.contexts]
    if bare:
        raise ValueError(f"{len(bare)} evaluated example(s) have no retrieved contexts, e.g. {bare[:3]}")
    retrieval = retrieval_metrics(rows, seed)
    out: dict[str, Any] = {"retrieval": retrieval.summary, "models": {}, "failures": {}, "rubrics": {}}
    if judge is None:
        return out
    missing = [n for n in (FAITHFULNESS_RUBRIC, RELEVANCY_RUBRIC) if n not in rubrics]
    if missing:
        raise ValueError(f"RAG metrics need the rubric(s) {missing}; available: {sorted(rubrics)}")
    faithfulness, relevancy = rubrics[FAITHFULNESS_RUBRIC], rubrics[RELEVANCY_RUBRIC]
    out["rubrics"] = {"faithfulness": f"{faithfulness.name}@{faithfulness.version}",
                      "answer_relevancy": f"{relevancy.name}@{relevancy.version}"}
    for label, ev in evals.items():
        if [p["example_id"] for p in ev.predictions] != [r.example_id for r in rows]:
            raise ValueError(f"{label}: its predictions are not of the evaluated examples, in order")
        log(f"{label}: judging faithfulness and answer relevancy of {len(rows)} answers")
        result = judged_metrics(judge, faithfulness, relevancy,
                                [replace(r, response=p["prediction"]) for r, p in zip(rows, ev.predictions,
                                                                                       strict=True)], seed, log)
        for metric in JUDGED_METRICS:
            summary = result.summary[metric]
            if summary["n"]:
                ev.metrics[metric] = summary["estimate"]
                ev.intervals[metric] = {k: summary[k] for k in ("estimate", "low", "high", "level")}
        for p, scored in zip(ev.predictions, result.rows, strict=True):
            p.update({k: v for k, v in scored.items() if k != "example_id"})
        out["models"][label] = result.summary
        out["failures"][label] = result.failures
    return out


def interval_text(summary: dict[str, Any]) -> str:
    """``0.812 [0.700, 0.905]`` (n=12), or why there is no value."""
    failed = f", {summary['failures']} failed" if summary.get("failures") else ""
    if not summary.get("n"):
        return f"- (none scored{failed})"
    return f"{summary['estimate']:.3f} [{summary['low']:.3f}, {summary['high']:.3f}] (n={summary['n']}{failed})"
