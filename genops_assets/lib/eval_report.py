"""The golden-set evaluation behind the eval_report asset: the models it evaluates, the baseline
the promotion gate compares the candidate with, the prompt comparison, and what it records."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genops_assets.lib.cache import CallCache
from genops_assets.lib.evaluation import EvalExample, GateDecision, ModelEval, evaluate_model, gate_decision
from genops_assets.lib.hashing import atomic_write_text, sha256_json
from genops_assets.lib.prompts import PromptRef
from genops_assets.lib.tasks import TaskSpec

SUMMARY_METRICS = ("valid_json_rate", "mean_field_exact_match", "overall_exact_match")
SAMPLE_EXAMPLES = 5  # golden examples whose answers (every model's) the report shows
PARITY_EXAMPLES = 16  # greedy answers the deployed endpoint must reproduce (serving parity)
NOT_COMPUTED = "not computed"


def adapter_on_base(base_digest: str, adapter_digest: str) -> str:
    """Cache identity of an adapter's answers: they depend on the base it sits on as well."""
    return sha256_json([base_digest, adapter_digest])


def metric_names(ev: ModelEval) -> list[str]:
    return [m for m in ev.metrics if m != "n_examples"]


@dataclass(frozen=True)
class FewShots:
    """Worked examples picked for each golden example (one list per example)."""

    k: int
    strategy: str
    per_example: list[list[tuple[str, dict]]]
    selector: dict[str, Any]


def select_few_shots(pool_df, inputs: Sequence[str], strategy: str, k: int,
                     embeddings_cache: Path | None = None) -> FewShots:
    """``k`` shots per input from the few_shot_examples mart rows ``pool_df``."""
    from genops_assets.lib.fewshot import FewShotSelector, Shot, shots_as_pairs

    embedder = None
    if strategy == "nearest":
        from genops_assets.lib.embeddings import Embedder

        embedder = Embedder(cache_path=embeddings_cache)
    pool = [Shot(r.example_id, r.input_text, json.loads(r.output_json), r.label) for r in pool_df.itertuples()]
    selector = FewShotSelector(pool, strategy, k, embedder=embedder)
    return FewShots(k, strategy, [shots_as_pairs(s) for s in selector.select_many(inputs)], selector.describe())


@dataclass(frozen=True)
class RegisteredAdapter:
    """A registered adapter evaluated beside the candidate: the champion, or, when the candidate
    already is the champion (a re-run), the champion before it."""

    role: str  # "champion" or "previous champion"
    version: str
    adapter_digest: str
    adapter_dir: str

    @property
    def label(self) -> str:
        return f"{self.role} v{self.version}"

    @property
    def adapter_name(self) -> str:
        return self.role.replace(" ", "_")


@dataclass(frozen=True)
class GoldenSetup:
    """What every model of the evaluation is asked, and which models there are."""

    spec: TaskSpec
    examples: Sequence[EvalExample]
    prompt: Any  # PromptTemplate of the production prompt
    base_digest: str
    candidate_version: str
    candidate_adapter_digest: str
    reference: RegisteredAdapter | None
    few_shots: FewShots | None
    batch_size: int

    @property
    def candidate_digest(self) -> str:
        return adapter_on_base(self.base_digest, self.candidate_adapter_digest)


@dataclass(frozen=True)
class GoldenEvaluation:
    base_zero_shot: ModelEval
    base: ModelEval  # the few-shot base model when shots were given, else base_zero_shot
    base_label: str
    candidate: ModelEval
    candidate_label: str
    reference: ModelEval | None  # the registered adapter of GoldenSetup.reference
    reference_adapter: RegisteredAdapter | None

    def by_label(self) -> dict[str, ModelEval]:
        out = {"base (0-shot)": self.base_zero_shot}
        if self.base is not self.base_zero_shot:
            out[self.base_label] = self.base
        out[self.candidate_label] = self.candidate
        if self.reference is not None:
            out[self.reference_adapter.label] = self.reference
        return out

    def mlflow_metrics(self) -> dict[str, float]:
        """Every model's metrics and interval bounds, prefixed by its role."""
        out: dict[str, float] = {}
        roles = [("base_0shot", self.base_zero_shot), ("base", self.base), ("candidate", self.candidate)]
        if self.reference is not None:
            roles.append((self.reference_adapter.adapter_name, self.reference))
        for role, ev in roles:
            out.update({f"{role}.{m}": v for m, v in ev.metrics.items()})
            out.update({f"{role}.{m}_{bound}": iv[bound] for m, iv in ev.intervals.items()
                        for bound in ("low", "high")})
        return out


def evaluate_golden(model: Callable[[], Any], setup: GoldenSetup, cache: CallCache, log) -> GoldenEvaluation:
    """The base model (0-shot, and k-shot when shots were picked), the candidate and the
    registered reference adapter on the golden set, with the production prompt."""

    def run(adapter: str | None, label: str, digest: str, shots_per_example=None) -> ModelEval:
        return evaluate_model(model, adapter, label, digest, setup.spec, setup.examples, [], cache,
                              setup.batch_size, log, prompt=setup.prompt, shots_per_example=shots_per_example)

    base_zero_shot = run(None, "base 0-shot", setup.base_digest)
    base, base_label = base_zero_shot, "base (0-shot)"
    if setup.few_shots is not None:
        shots = setup.few_shots
        base = run(None, f"base {shots.k}-shot", setup.base_digest, shots.per_example)
        base_label = f"base ({shots.k}-shot, {shots.strategy})"
    candidate = run("candidate", f"v{setup.candidate_version}", setup.candidate_digest)
    reference = None
    ref = setup.reference
    if ref is not None:
        reference = run(ref.adapter_name, ref.label, adapter_on_base(setup.base_digest, ref.adapter_digest))
    return GoldenEvaluation(base_zero_shot, base, base_label, candidate, f"candidate v{setup.candidate_version}",
                            reference, ref)


def promotion_gate(evaluation: GoldenEvaluation, reference: RegisteredAdapter | None, primary_metric: str,
                   margin: float) -> tuple[GateDecision, str]:
    """The gate against the registered reference adapter when there is one, else against the
    base model; returns the decision and the baseline's role ("champion", "previous champion"
    or "base model"). The candidate is never compared with itself."""
    cand = evaluation.candidate
    if reference is not None and evaluation.reference is not None:
        baseline, name, role = evaluation.reference, reference.label, reference.role
    else:
        baseline, name, role = evaluation.base, "base model", "base model"
    return gate_decision(cand.metrics, baseline.metrics, name, primary_metric, margin, cand.scores,
                         baseline.scores), role


DECODING_METRICS = ("valid_json_rate", "mean_field_exact_match", "latency_p50_s")
"""What the constrained / unconstrained comparison shows (with the task's primary metric)."""


@dataclass(frozen=True)
class DecodingComparison:
    """The candidate with the task's output schema enforced and without, on the same golden
    examples and prompt: what constraining buys on valid JSON, field exact match and latency.
    The gate and serving parity use the task's own setting (``setting``)."""

    setting: bool  # the task's generation.constrained
    evals: dict[str, ModelEval]  # "constrained" / "unconstrained"
    primary_metric: str

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*DECODING_METRICS[:2], self.primary_metric, DECODING_METRICS[2])))

    def value(self, way: str, metric: str) -> float:
        ev = self.evals[way]
        if metric not in ev.metrics:
            raise KeyError(f"{way} evaluation has no '{metric}' (have: {sorted(ev.metrics)})")
        return float(ev.metrics[metric])

    def rows(self) -> list[dict[str, Any]]:
        """One row per way of decoding, for the Dagster metadata table and the asset's value."""
        return [{"decoding": way, "task_setting": (way == "constrained") == self.setting,
                 **{m: self.value(way, m) for m in self.metrics}} for way in self.evals]

    def mlflow_metrics(self) -> dict[str, float]:
        return {f"{way}/{m}": self.value(way, m) for way in self.evals for m in self.metrics}

    def section(self) -> tuple[str, str, str]:
        """(title, markdown, html) of the comparison for the report."""
        from markupsafe import escape

        header = ["decoding", *self.metrics]
        cells = [[f"{r['decoding']}{' (task setting)' if r['task_setting'] else ''}",
                  *(f"{r[m]:.3f}" for m in self.metrics)] for r in self.rows()]
        md = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                         *("| " + " | ".join(c) + " |" for c in cells)])
        html = ("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in cells)
                + "</table>")
        return "Decoding within the output schema, and without", md, html


def compare_decoding(model: Callable[[], Any], setup: GoldenSetup, cache: CallCache, log,
                     candidate: ModelEval) -> DecodingComparison:
    """The candidate evaluated the other way too (unconstrained when the task decodes within its
    output schema, constrained otherwise), beside its evaluation with the task's setting."""
    spec = setup.spec
    other_way = not spec.constrained
    label = f"v{setup.candidate_version} ({'constrained' if other_way else 'unconstrained'})"
    other = evaluate_model(model, "candidate", label, setup.candidate_digest, spec, setup.examples, [], cache,
                           setup.batch_size, log, prompt=setup.prompt, constrained=other_way)
    evals = {"constrained": other if other_way else candidate, "unconstrained": candidate if other_way else other}
    return DecodingComparison(spec.constrained, evals, spec.primary_metric)


@dataclass(frozen=True)
class PromptComparison:
    evaluation: ModelEval  # the candidate adapter with the candidate prompt
    label: str
    section: tuple[str, str, str]  # (title, markdown, html) for the report
    summary: dict[str, Any]


def compare_prompt(model: Callable[[], Any], setup: GoldenSetup, cache: CallCache, log, production: PromptRef,
                   candidate_prompt: PromptRef, candidate: ModelEval) -> PromptComparison:
    """The tuned adapter with the registry's `candidate` prompt, beside its answers with the
    production prompt: the template diff, the metric deltas and the paired interval of the
    primary metric."""
    from genops_assets.lib.metrics import per_example
    from genops_assets.lib.prompts import template_diff
    from genops_assets.lib.report import prompt_comparison_section
    from genops_assets.lib.stats import paired_difference_ci

    primary = setup.spec.primary_metric
    variant = evaluate_model(model, "candidate", f"v{setup.candidate_version} + prompt v{candidate_prompt.version}",
                             setup.candidate_digest, setup.spec, setup.examples, [], cache, setup.batch_size, log,
                             prompt=candidate_prompt.template)
    old_label = f"prompt v{production.version} (production)"
    new_label = f"prompt v{candidate_prompt.version} (candidate)"
    diff = template_diff(production.template, candidate_prompt.template, old_label, new_label)
    rows = [(m, float(candidate.metrics[m]), float(variant.metrics[m]))
            for m in metric_names(candidate) if m in variant.metrics]
    interval = paired_difference_ci(per_example(variant.scores, primary), per_example(candidate.scores, primary))
    summary = {"production_version": production.version, "candidate_version": candidate_prompt.version,
               "deltas": {m: new - old for m, old, new in rows}, "primary_interval": interval.as_dict(),
               "diff": diff}
    return PromptComparison(
        variant, f"candidate v{setup.candidate_version} + prompt v{candidate_prompt.version}",
        prompt_comparison_section(old_label, new_label, diff, rows, interval.as_dict(), primary), summary)


def sample_predictions(evals: Mapping[str, ModelEval], n: int = SAMPLE_EXAMPLES) -> list[dict[str, Any]]:
    """Every model's answer to the first ``n`` golden examples, for the report."""
    count = min(n, len(next(iter(evals.values())).predictions)) if evals else 0
    return [{"example_id": p["example_id"], "model": label, "input": p["input"], "prediction": p["prediction"],
             "valid_json": p["valid_json"]}
            for i in range(count) for label, ev in evals.items() for p in (ev.predictions[i],)]


def write_predictions(path: Path, evals: Mapping[str, ModelEval]) -> Path:
    """Every model's golden-set predictions as JSON Lines (one row per model and example)."""
    atomic_write_text(path, "".join(json.dumps({"model": label, **p}, ensure_ascii=False) + "\n"
                                    for label, ev in evals.items() for p in ev.predictions))
    return path


def parity_examples(candidate: ModelEval, n: int = PARITY_EXAMPLES) -> list[dict[str, Any]]:
    """The candidate's first greedy answers, which the deployed endpoint must reproduce."""
    return [{"example_id": p["example_id"], "input": p["input"], "prediction": p["prediction"],
             **({"contexts": p["contexts"]} if "contexts" in p else {})} for p in candidate.predictions[:n]]


def rouge_l_summary(metrics: Mapping[str, float], text_fields: Sequence[str]) -> dict[str, float | str]:
    """ROUGE-L of each of the task's text fields (``rouge_l_<field>``); ``not computed`` for a
    task without text fields. A text field without its metric is an error, never a 0.0."""
    if not text_fields:
        return {"rouge_l": f"{NOT_COMPUTED} (the task has no text field)"}
    missing = [f for f in text_fields if f"rouge_l_{f}" not in metrics]
    if missing:
        raise KeyError(f"evaluation metrics lack ROUGE-L of text field(s) {missing} "
                       f"(have: {sorted(metrics)})")
    return {f"rouge_l_{f}": float(metrics[f"rouge_l_{f}"]) for f in text_fields}


def rag_mlflow_metrics(rag: Mapping[str, Any]) -> dict[str, float]:
    """Retrieval metrics once (``retrieval.*``) and the judge's usage (``rag_judge.*``: calls,
    cached, failures); the judged means and intervals are logged with each model's metrics."""
    out: dict[str, float] = {}
    for metric, summary in rag["retrieval"].items():
        out[f"retrieval.{metric}_n"] = float(summary["n"])
        if summary["n"]:
            out.update({f"retrieval.{metric}": summary["estimate"], f"retrieval.{metric}_low": summary["low"],
                        f"retrieval.{metric}_high": summary["high"]})
    if rag["judge_usage"]:
        out.update({f"rag_judge.{k}": float(v) for k, v in rag["judge_usage"].items()})
    return out
