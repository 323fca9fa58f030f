"""Offline evaluation on the golden set: batched generation, scoring, the promotion gate.

Predictions are cached by content (model digest, prompts, decoding parameters), so an
unchanged model is never asked twice for the same golden set.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from genops_assets.lib.formatting import build_messages
from genops_assets.lib.hashing import atomic_write_json, sha256_json
from genops_assets.lib.metrics import aggregate, score_example
from genops_assets.lib.tasks import TaskSpec


@dataclass(frozen=True)
class EvalExample:
    example_id: str
    input_text: str
    reference: dict[str, Any]


@dataclass
class ModelEval:
    name: str
    model_digest: str
    metrics: dict[str, float]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    cached: bool = False


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    primary_metric: str
    candidate: float
    baseline: float
    baseline_name: str
    margin: float
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def eval_cache_key(model_digest: str, messages: Sequence[list[dict[str, str]]], decoding: Mapping[str, Any]) -> str:
    return sha256_json({"model": model_digest, "messages": list(messages), "decoding": dict(decoding)})


def evaluate_model(
    loaded,
    adapter: str | None,
    name: str,
    model_digest: str,
    task: TaskSpec,
    examples: Sequence[EvalExample],
    shots: Sequence[tuple[str, Mapping[str, Any]]],
    cache_dir: Path,
    batch_size: int = 8,
    log=print,
) -> ModelEval:
    """Generate answers for every example (or read them from the cache) and score them."""
    from genops_assets.lib.generation import generate

    if not examples:
        raise ValueError("the golden evaluation set is empty: nothing to evaluate")
    messages = [build_messages(task, ex.input_text, shots) for ex in examples]
    decoding = {"max_new_tokens": task.max_new_tokens, "temperature": 0.0}
    key = eval_cache_key(model_digest, messages, decoding)
    cache_file = cache_dir / f"{key}.json"
    cached = cache_file.is_file()
    if cached:
        log(f"{name}: predictions read from cache {cache_file.name}")
        stored = json.loads(cache_file.read_text())
        texts, latencies = stored["texts"], stored["latencies"]
    else:
        # Sort by prompt length so each batch pads little, then restore the original order.
        if callable(loaded):  # loaded lazily: a fully cached evaluation never loads the model
            loaded = loaded()
        order = sorted(range(len(messages)), key=lambda i: len(examples[i].input_text))
        texts, latencies = [""] * len(messages), [0.0] * len(messages)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            results = generate(loaded, [messages[i] for i in idx], adapter=adapter,
                               max_new_tokens=task.max_new_tokens, temperature=0.0, batch_size=batch_size)
            for i, r in zip(idx, results, strict=True):
                texts[i], latencies[i] = r.text, r.latency_s
            log(f"{name}: generated {min(start + batch_size, len(order))}/{len(order)}")
        atomic_write_json(cache_file, {"texts": texts, "latencies": latencies, "decoding": decoding})
    scores = [
        score_example(ex.example_id, text, ex.reference, task.label_fields, task.text_fields, task.output_fields)
        for ex, text in zip(examples, texts, strict=True)
    ]
    metrics = aggregate(scores, latencies)
    predictions = [
        {
            "example_id": ex.example_id,
            "input": ex.input_text,
            "reference": ex.reference,
            "prediction": text,
            "valid_json": s.valid_json,
            "field_match": s.field_match,
            "latency_s": lat,
        }
        for ex, text, s, lat in zip(examples, texts, scores, latencies, strict=True)
    ]
    return ModelEval(name, model_digest, metrics, predictions, cached)


def gate_decision(
    candidate: Mapping[str, float],
    baseline: Mapping[str, float],
    baseline_name: str,
    primary_metric: str,
    margin: float,
) -> GateDecision:
    """The candidate is promoted only if it beats the baseline by ``margin`` on the primary metric."""
    if primary_metric not in candidate or primary_metric not in baseline:
        raise KeyError(f"primary metric '{primary_metric}' missing from evaluation results")
    c, b = float(candidate[primary_metric]), float(baseline[primary_metric])
    passed = c >= b + margin
    verb = "beats" if passed else "does not beat"
    reason = f"candidate {primary_metric}={c:.4f} {verb} {baseline_name}={b:.4f} + margin {margin:.4f}"
    return GateDecision(passed, primary_metric, c, b, baseline_name, margin, reason)
