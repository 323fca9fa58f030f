"""LLM-driven prompt enhancement: propose rewrites from the last evaluation's failures, score
them on the validation split, and keep the best only when it beats production by the gate.

The teacher is any callable ``complete(messages, seed) -> str`` (in the assets: the judge
endpoint), so the selection logic is testable with a scripted double. Candidates never see
the golden set: ``select_prompt`` refuses examples whose ids are golden.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from genops_assets.lib.evaluation import GateDecision, ModelEval, gate_decision
from genops_assets.lib.prompts import PromptError, PromptTemplate

# (mode, instruction): "rewrite" replaces the system instructions, "append" adds rules to them.
DIRECTIONS: tuple[tuple[str, str], ...] = (
    ("append", "Write two or three short rules that would have prevented these mistakes."),
    ("rewrite", "Rewrite the instructions so they are clearer and more precise. Keep every allowed value."),
    ("append", "Write one short rule about how to choose the priority, and one about the product."),
    ("rewrite", "Rewrite the instructions more concisely. Keep every allowed value and the JSON keys."),
)
MIN_CHARS = 20
MAX_GROWTH = 4.0

_FENCE = re.compile(r"^```[a-z]*\s*|\s*```$", re.MULTILINE)
_PREAMBLE = re.compile(r"^(here (is|are)|sure|certainly|okay|ok)\b[^\n]*:?\s*\n", re.IGNORECASE)


@dataclass
class Candidate:
    index: int
    mode: str
    direction: str
    raw_text: str
    template: PromptTemplate | None = None
    skip_reason: str | None = None
    version: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "mode": self.mode, "direction": self.direction, "raw_text": self.raw_text,
                "system": self.template.system if self.template else None, "skip_reason": self.skip_reason,
                "version": self.version, "metrics": self.metrics}


def failure_digest(predictions: Sequence[Mapping[str, Any]], label_fields: Sequence[str], limit: int = 4) -> str:
    """Up to ``limit`` mistakes of the last evaluation as text: message, expected and given answer."""
    lines = []
    for p in predictions:
        matches = p.get("field_match") or {}
        wrong = [f for f in label_fields if not matches.get(f)]
        if not wrong:
            continue
        expected = {f: (p.get("reference") or {}).get(f) for f in label_fields}
        lines.append(f"Message: {str(p['input'])[:240]}\nExpected: {json.dumps(expected)}\n"
                     f"Model answered: {str(p['prediction'])[:200]}\nWrong fields: {', '.join(wrong)}")
        if len(lines) >= limit:
            break
    return "\n\n".join(lines)


def enhancement_messages(production: PromptTemplate, failures: str, instruction: str) -> list[dict[str, str]]:
    """The teacher's request: the current instructions, the mistakes, what to write."""
    shown = production.system.replace("{few_shot}", "").strip()
    return [
        {"role": "system", "content": "You improve instructions for a model that triages support messages."},
        {"role": "user", "content": f"Current instructions:\n{shown}\n\n"
                                    f"Mistakes made with them:\n{failures or '(none recorded)'}\n\n"
                                    f"{instruction} Reply with the text only."},
    ]


def clean_llm_text(text: str) -> str:
    cleaned = _FENCE.sub("", text.strip()).strip()
    cleaned = _PREAMBLE.sub("", cleaned, count=1).strip()
    return cleaned.strip('"').strip()


def build_candidate(production: PromptTemplate, raw: str, mode: str) -> tuple[PromptTemplate | None, str | None]:
    """A template from the teacher's text, or the reason it is skipped."""
    text = clean_llm_text(raw)
    if not text:
        return None, "empty candidate: the teacher returned no text"
    if len(text) < MIN_CHARS:
        return None, f"candidate too short ({len(text)} characters, at least {MIN_CHARS})"
    if len(text) > MAX_GROWTH * max(len(production.system), 100):
        return None, f"candidate too long ({len(text)} characters, production has {len(production.system)})"
    if mode == "append":
        # Keep the few-shot slot (if any) last, so examples stay right before the message.
        base = production.system.replace("{few_shot}", "").rstrip()
        system = base + "\n" + text + ("\n{few_shot}" if "{few_shot}" in production.system else "")
    else:
        system = text if "{few_shot}" in text or "{few_shot}" not in production.system else text + "\n{few_shot}"
    try:
        template = production.with_system(system).validate("candidate")
    except PromptError as exc:
        return None, f"invalid template: {exc}"
    if template.digest == production.digest:
        return None, "identical to production"
    return template, None


def propose_candidates(complete: Callable[[list[dict[str, str]], int], str], production: PromptTemplate,
                       failures: str, n: int, log=print) -> list[Candidate]:
    """Ask the teacher for ``n`` candidates (directions in turn, one seed each); duplicates and
    unusable answers are kept with their skip reason, so the record shows every attempt."""
    if n < 1:
        raise ValueError("n must be >= 1")
    out: list[Candidate] = []
    seen = {production.digest}
    for i in range(n):
        mode, instruction = DIRECTIONS[i % len(DIRECTIONS)]
        try:
            raw = complete(enhancement_messages(production, failures, instruction), i)
        except Exception as exc:
            out.append(Candidate(i, mode, instruction, "", skip_reason=f"teacher call failed: {exc}"))
            log(f"candidate {i + 1}/{n}: skipped (teacher call failed: {exc})")
            continue
        template, reason = build_candidate(production, raw, mode)
        if template is not None and template.digest in seen:
            template, reason = None, "duplicate of an earlier candidate"
        if template is not None:
            seen.add(template.digest)
        out.append(Candidate(i, mode, instruction, raw, template, reason))
        log(f"candidate {i + 1}/{n}: " + (f"skipped ({reason})" if reason else f"{mode}, {len(template.system)} chars"))
    return out


@dataclass
class Selection:
    production: ModelEval
    evaluated: list[tuple[Candidate, ModelEval]]
    best: Candidate | None
    gate: GateDecision | None

    @property
    def promoted(self) -> bool:
        return self.gate is not None and self.gate.passed


def select_prompt(
    production: PromptTemplate,
    production_label: str,
    candidates: Sequence[Candidate],
    evaluate: Callable[[PromptTemplate, str], ModelEval],
    example_ids: Sequence[str],
    golden_ids: set[str],
    primary_metric: str,
    margin: float,
) -> Selection:
    """Score production and every usable candidate with ``evaluate`` (on ``example_ids``, which
    must be validation rows), pick the best by the primary metric, and gate it against
    production with the lower bound of the paired improvement."""
    leaked = sorted(set(example_ids) & golden_ids)
    if leaked:
        raise ValueError(f"prompt selection must not use golden examples; got {len(leaked)} (e.g. {leaked[0]})")
    if not example_ids:
        raise ValueError("no validation examples to select prompts on")
    prod_eval = evaluate(production, production_label)
    evaluated = []
    for cand in candidates:
        if cand.template is None:
            continue
        ev = evaluate(cand.template, f"candidate {cand.index + 1}")
        cand.metrics = {k: float(v) for k, v in ev.metrics.items()}
        evaluated.append((cand, ev))
    if not evaluated:
        return Selection(prod_eval, [], None, None)
    # Best by the primary metric; ties go to the earlier candidate.
    best, best_eval = max(evaluated, key=lambda ce: (ce[1].metrics[primary_metric], -ce[0].index))
    gate = gate_decision(best_eval.metrics, prod_eval.metrics, production_label, primary_metric, margin,
                         best_eval.scores, prod_eval.scores)
    return Selection(prod_eval, evaluated, best, gate)
