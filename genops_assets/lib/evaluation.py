"""Offline evaluation on the golden set: batched generation, scoring, the promotion gate.

Predictions are cached by content (model digest, prompts, decoding parameters), so an
unchanged model is never asked twice for the same golden set.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from genops_assets.lib.cache import CallCache, cache_key
from genops_assets.lib.constrained import schema_digest
from genops_assets.lib.formatting import build_messages
from genops_assets.lib.metrics import ExampleScore, aggregate, per_example, score_example
from genops_assets.lib.prompts import PromptTemplate
from genops_assets.lib.stats import paired_difference_ci
from genops_assets.lib.tasks import TaskSpec


@dataclass(frozen=True)
class EvalExample:
    example_id: str
    input_text: str
    reference: dict[str, Any]
    contexts: tuple[str, ...] = ()  # retrieved passages shown to the model (tasks with contexts)
    reference_contexts: tuple[str, ...] = ()  # passages that should have been retrieved, when known

    def identity(self) -> tuple:
        """What the example is, for digests; a task without contexts keeps its historical form."""
        base = (self.example_id, self.input_text, self.reference)
        return (*base, self.contexts, self.reference_contexts) if self.contexts else base


def examples_from_frame(df) -> list[EvalExample]:
    """EvalExamples from rows of a mart (golden_eval_dataset, sft_dataset), with their
    passages when the mart has them."""
    has_contexts = "contexts_json" in df.columns

    def passages(value) -> tuple[str, ...]:
        return tuple(json.loads(value)) if isinstance(value, str) else ()  # NULL: None or NaN

    return [EvalExample(r.example_id, r.input_text, json.loads(r.output_json),
                        passages(r.contexts_json) if has_contexts else (),
                        passages(r.reference_contexts_json) if has_contexts else ())
            for r in df.itertuples()]


@dataclass
class ModelEval:
    name: str
    model_digest: str
    metrics: dict[str, float]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    cached: bool = False
    scores: list[ExampleScore] = field(default_factory=list)
    model_calls: int = 0
    # 95% bootstrap intervals of metrics that are means of per-row scores (as Interval.as_dict())
    intervals: dict[str, dict[str, float]] = field(default_factory=dict)
    constrained: bool = False  # answers decoded within the task's output schema


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    primary_metric: str
    candidate: float
    baseline: float
    baseline_name: str
    margin: float
    reason: str
    improvement_low: float | None = None
    improvement_high: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def generation_key(model_digest: str, messages: Sequence[Mapping[str, str]], decoding: Mapping[str, Any]) -> str:
    """Cache key of one generation: model (or adapter) digest, the rendered prompt, decoding."""
    return cache_key(kind="generation", model=model_digest, messages=list(messages), decoding=dict(decoding))


def evaluate_model(
    loaded,
    adapter: str | None,
    name: str,
    model_digest: str,
    task: TaskSpec,
    examples: Sequence[EvalExample],
    shots: Sequence[tuple[str, Mapping[str, Any]]],
    cache: CallCache,
    batch_size: int = 8,
    log=print,
    prompt: PromptTemplate | None = None,
    shots_per_example: Sequence[Sequence[tuple[str, Mapping[str, Any]]]] | None = None,
    *,
    constrained: bool | None = None,
    engine: Callable[..., list] | None = None,
) -> ModelEval:
    """Generate answers for every example (each read from the cache when already made) and score them.

    Only the examples missing from the cache reach the model, so a re-run of an unchanged
    evaluation makes no model call and a failed run resumes where it stopped.

    ``constrained`` (None: the task's ``generation.constrained``) decodes within the task's
    output schema; the cache key says which way an answer was made. ``engine(messages_batch,
    max_new_tokens, json_schema)`` generates greedily on another engine (a llama.cpp server);
    None is genops' own engine on ``loaded`` with ``adapter``.
    """
    from genops_assets.serving.generation import generate

    if not examples:
        raise ValueError("the golden evaluation set is empty: nothing to evaluate")
    if shots_per_example is not None and len(shots_per_example) != len(examples):
        raise ValueError("shots_per_example needs one entry per example")
    messages = [build_messages(task, ex.input_text, shots_per_example[i] if shots_per_example is not None else shots,
                               prompt, ex.contexts) for i, ex in enumerate(examples)]
    max_new_tokens = prompt.max_new_tokens if prompt else task.max_new_tokens
    decoding: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
    constrained = task.constrained if constrained is None else constrained
    json_schema = task.schema if constrained else None
    if json_schema is not None:  # unconstrained answers keep their historical keys
        decoding["json_schema"] = schema_digest(json_schema)
    keys = [generation_key(model_digest, m, decoding) for m in messages]
    texts: list[str | None] = [None] * len(messages)
    latencies = [0.0] * len(messages)
    for i, k in enumerate(keys):
        hit = cache.get(k)
        if hit is not None:
            texts[i], latencies[i] = hit["text"], hit["latency_s"]
    missing = [i for i, t in enumerate(texts) if t is None]
    log(f"{name}: {len(examples) - len(missing)}/{len(examples)} predictions from the cache, "
        f"{len(missing)} to generate")
    calls = 0
    if missing:
        if engine is None:
            if callable(loaded):  # loaded lazily: a fully cached evaluation never loads the model
                loaded = loaded()

            def engine(batch, max_new_tokens, json_schema):
                return generate(loaded, batch, adapter=adapter, max_new_tokens=max_new_tokens, temperature=0.0,
                                batch_size=batch_size, json_schema=json_schema)
        # Sort by prompt length so each batch pads little; results go back to their rows.
        order = sorted(missing, key=lambda i: len(examples[i].input_text))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            results = engine([messages[i] for i in idx], max_new_tokens, json_schema)
            calls += 1
            for i, r in zip(idx, results, strict=True):
                texts[i], latencies[i] = r.text, r.latency_s
                cache.put(keys[i], "generation", {"text": r.text, "latency_s": r.latency_s,
                                                  "completion_tokens": r.completion_tokens})
            log(f"{name}: generated {min(start + batch_size, len(order))}/{len(order)}")
    final = [t or "" for t in texts]
    scores = [
        score_example(ex.example_id, text, ex.reference, task.label_fields, task.text_fields, task.output_fields)
        for ex, text in zip(examples, final, strict=True)
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
            **({"contexts": list(ex.contexts)} if ex.contexts else {}),
        }
        for ex, text, s, lat in zip(examples, final, scores, latencies, strict=True)
    ]
    return ModelEval(name, model_digest, metrics, predictions, cached=not missing, scores=scores,
                     model_calls=calls, constrained=constrained)


def gate_decision(
    candidate: Mapping[str, float],
    baseline: Mapping[str, float],
    baseline_name: str,
    primary_metric: str,
    margin: float,
    candidate_scores: Sequence[ExampleScore] | None = None,
    baseline_scores: Sequence[ExampleScore] | None = None,
    level: float = 0.95,
) -> GateDecision:
    """Promote only if the candidate beats the baseline by ``margin`` on the primary metric.

    With per-example scores of both (the same examples), the decision uses the lower bound of
    the bootstrap interval of the paired improvement, not the point estimate: a lucky draw of
    the golden set does not promote a model.
    """
    if primary_metric not in candidate or primary_metric not in baseline:
        raise KeyError(f"primary metric '{primary_metric}' missing from evaluation results")
    c, b = float(candidate[primary_metric]), float(baseline[primary_metric])
    if candidate_scores and baseline_scores:
        ci = paired_difference_ci(per_example(candidate_scores, primary_metric),
                                  per_example(baseline_scores, primary_metric), level=level)
        passed = ci.low >= margin
        verb = "beats" if passed else "does not beat"
        reason = (f"candidate {primary_metric}={c:.4f} {verb} {baseline_name}={b:.4f}: improvement "
                  f"{ci.estimate:+.4f}, {int(level * 100)}% interval [{ci.low:+.4f}, {ci.high:+.4f}], "
                  f"lower bound vs margin {margin:.4f}")
        return GateDecision(passed, primary_metric, c, b, baseline_name, margin, reason, ci.low, ci.high)
    passed = c >= b + margin
    verb = "beats" if passed else "does not beat"
    reason = f"candidate {primary_metric}={c:.4f} {verb} {baseline_name}={b:.4f} + margin {margin:.4f}"
    return GateDecision(passed, primary_metric, c, b, baseline_name, margin, reason)


def sample_pass_rates(
    loaded,
    adapter: str | None,
    model_digest: str,
    task: TaskSpec,
    examples: Sequence[EvalExample],
    cache: CallCache,
    n: int,
    temperature: float = 0.7,
    batch_size: int = 8,
    log=print,
    prompt: PromptTemplate | None = None,
) -> dict[str, Any]:
    """n sampled answers per example; pass = every label field right. pass@k and pass^k per k,
    averaged over examples, with bootstrap intervals. Samples are cached like greedy answers."""
    from genops_assets.lib.stats import bootstrap_ci, pass_at_k, pass_hat_k
    from genops_assets.serving.generation import generate

    if n < 2:
        raise ValueError("sampling needs n >= 2")
    max_new_tokens = prompt.max_new_tokens if prompt else task.max_new_tokens
    passes: list[int] = []
    calls = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        messages = [build_messages(task, ex.input_text, [], prompt, ex.contexts) for ex in chunk]
        counts = [0] * len(chunk)
        for s in range(n):
            decoding = {"max_new_tokens": max_new_tokens, "temperature": temperature, "sample": s}
            keys = [generation_key(model_digest, m, decoding) for m in messages]
            hits = [cache.get(k) for k in keys]
            if any(h is None for h in hits):
                if callable(loaded):
                    loaded = loaded()
                results = generate(loaded, messages, adapter=adapter, max_new_tokens=max_new_tokens,
                                   temperature=temperature, batch_size=batch_size, seed=1000 * s + start)
                calls += 1
                hits = []
                for k, r in zip(keys, results, strict=True):
                    value = {"text": r.text, "latency_s": r.latency_s, "completion_tokens": r.completion_tokens}
                    cache.put(k, "generation", value)
                    hits.append(value)
            for j, (ex, h) in enumerate(zip(chunk, hits, strict=True)):
                sc = score_example(ex.example_id, h["text"], ex.reference, task.label_fields, task.text_fields,
                                   task.output_fields)
                counts[j] += int(sc.all_labels_match)
        passes.extend(counts)
        log(f"sampling: {min(start + batch_size, len(examples))}/{len(examples)} examples x {n} samples")
    out: dict[str, Any] = {"n": n, "temperature": temperature, "model_calls": calls}
    for k in sorted({1, n}):
        out[f"pass@{k}"] = bootstrap_ci([pass_at_k(n, c, k) for c in passes]).as_dict()
        out[f"pass^{k}"] = bootstrap_ci([pass_hat_k(n, c, k) for c in passes]).as_dict()
    return out
