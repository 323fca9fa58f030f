"""Computation metrics for structured generation: validity, exact match, ROUGE-L, BLEU."""

from __future__ import annotations

import functools
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from genops_assets.lib.formatting import parse_prediction
from genops_assets.lib.stats import percentile

PRIMARY_METRICS = ("mean_field_exact_match", "overall_exact_match", "valid_json_rate")


@dataclass(frozen=True)
class ExampleScore:
    example_id: str
    valid_json: bool
    field_match: dict[str, bool]
    rouge_l: dict[str, float]
    bleu: dict[str, float]
    json_found: bool | None = None  # an object could be extracted (lenient); None: same as valid_json

    @property
    def found(self) -> bool:
        return self.valid_json if self.json_found is None else self.json_found

    @property
    def all_labels_match(self) -> bool:
        return self.found and all(self.field_match.values())


def _norm_label(value: Any) -> str | None:
    return None if value is None else str(value).strip().lower()


@functools.cache
def _rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score's implementation, stemmed tokens)."""
    return float(_rouge_l_scorer().score(reference, prediction)["rougeL"].fmeasure)


def sentence_bleu(prediction: str, reference: str) -> float:
    """Sentence BLEU in [0, 1] (sacrebleu, exponential smoothing)."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(prediction, [reference]).score) / 100.0


def score_example(
    example_id: str,
    prediction_text: str,
    reference: Mapping[str, Any],
    label_fields: Sequence[str],
    text_fields: Sequence[str],
    output_fields: Sequence[str],
) -> ExampleScore:
    strict = parse_prediction(prediction_text, output_fields)
    valid = strict is not None
    # Fields are read from the first JSON object in the answer, even after some prose; the
    # strict valid-JSON rate says separately whether the answer was only that object.
    parsed = strict if valid else parse_prediction(prediction_text, output_fields, lenient=True)
    found = parsed is not None
    parsed = parsed or {}
    field_match = {
        f: found and _norm_label(parsed.get(f)) is not None
        and _norm_label(parsed.get(f)) == _norm_label(reference.get(f))
        for f in label_fields
    }
    rouge: dict[str, float] = {}
    bleu: dict[str, float] = {}
    for f in text_fields:
        pred = parsed.get(f) if isinstance(parsed.get(f), str) else ""
        ref = str(reference.get(f) or "")
        rouge[f] = rouge_l_f1(pred, ref) if pred and ref else 0.0
        bleu[f] = sentence_bleu(pred, ref) if pred and ref else 0.0
    return ExampleScore(example_id, valid, field_match, rouge, bleu, found)


def aggregate(scores: Sequence[ExampleScore], latencies_s: Sequence[float] = ()) -> dict[str, float]:
    """Dataset-level metrics; raises on an empty set rather than inventing a number."""
    if not scores:
        raise ValueError("cannot aggregate metrics over zero examples")
    n = len(scores)
    out: dict[str, float] = {"n_examples": float(n)}
    out["valid_json_rate"] = sum(s.valid_json for s in scores) / n
    out["json_found_rate"] = sum(s.found for s in scores) / n
    fields = list(scores[0].field_match)
    for f in fields:
        out[f"exact_match_{f}"] = sum(s.field_match[f] for s in scores) / n
    out["mean_field_exact_match"] = (
        statistics.fmean(out[f"exact_match_{f}"] for f in fields) if fields else 0.0
    )
    out["overall_exact_match"] = sum(s.all_labels_match for s in scores) / n
    for f in scores[0].rouge_l:
        out[f"rouge_l_{f}"] = statistics.fmean(s.rouge_l[f] for s in scores)
        out[f"bleu_{f}"] = statistics.fmean(s.bleu[f] for s in scores)
    if latencies_s:
        out["latency_mean_s"] = statistics.fmean(latencies_s)
        out["latency_p50_s"] = percentile(latencies_s, 50)
        out["latency_p95_s"] = percentile(latencies_s, 95)
    return out


def per_example(scores: Sequence[ExampleScore], metric: str) -> list[float]:
    """One value per example of a dataset-level metric (its mean over examples is the metric)."""
    if metric == "valid_json_rate":
        return [float(s.valid_json) for s in scores]
    if metric == "mean_field_exact_match":
        return [statistics.fmean(s.field_match.values()) if s.field_match else 0.0 for s in scores]
    if metric == "overall_exact_match":
        return [float(s.all_labels_match) for s in scores]
    for prefix, attr in (("exact_match_", "field_match"), ("rouge_l_", "rouge_l"), ("bleu_", "bleu")):
        if metric.startswith(prefix):
            f = metric[len(prefix):]
            return [float(getattr(s, attr)[f]) for s in scores]
    raise KeyError(f"no per-example form of metric '{metric}'")
