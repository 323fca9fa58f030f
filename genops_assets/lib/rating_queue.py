"""What people are asked to rate: the rating queue of one task, built from stored outputs.

Three sources, each a list of :class:`~genops_assets.lib.ratings.RatingItem`:

- ``golden``: the last evaluation's answers on the golden set, the candidate against the
  champion (the base model when there is none), one pairwise item per prompt whose answers differ;
- ``live``: served requests of the task; an input that two versions answered becomes a
  pairwise item (the two most recent versions), any other input a single answer to score and
  correct;
- ``gold``: gold questions, a golden reference answer against a corrupted copy of itself
  (lib/probes.py), the right choice known, about ``feedback.gold_share`` of the queue.

Prompts flagged by prompt drift, by online quality (a live answer the judge scored below the
version's golden-set mean) or by judge disagreement (AutoSxS verdicts that flip with the answer
order) come first: each reason adds one to an item's priority and is named in its reasons.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from genops_assets.lib.probes import probe_pairs
from genops_assets.lib.ratings import RatingItem
from genops_assets.lib.tasks import TaskSpec
from genops_assets.lib.validation import normalise_text

DRIFT = "drift"
ONLINE_QUALITY = "online_quality"
JUDGE_DISAGREEMENT = "judge_disagreement"


def model_name(task: str, label: str | None) -> str:
    """The name a rating item gives an answer's model: ``<task>:v<N>`` for an adapter version
    (evaluation labels ``candidate v3`` / ``champion v2``, or a served adapter version), ``base``
    for the base model."""
    if label is None or label == "" or label.startswith("base"):
        return "base"
    found = re.search(r"v?(\d+)$", label.strip())
    if not found:
        raise ValueError(f"cannot name the model of '{label}' (expected 'candidate vN', 'champion vN', a version "
                         "number or 'base ...')")
    return f"{task}:v{found.group(1)}"


@dataclass
class Flags:
    """Why prompts should be rated first, by example id, request id or normalised input."""

    by_example: dict[str, set[str]] = field(default_factory=dict)
    by_request: dict[str, set[str]] = field(default_factory=dict)
    by_input: dict[str, set[str]] = field(default_factory=dict)

    def add(self, reason: str, example_id: str | None = None, request_id: str | None = None,
            input_text: str | None = None) -> None:
        if example_id:
            self.by_example.setdefault(example_id, set()).add(reason)
        if request_id:
            self.by_request.setdefault(request_id, set()).add(reason)
        if input_text:
            self.by_input.setdefault(normalise_text(input_text), set()).add(reason)

    def reasons(self, example_id: str | None = None, request_ids: Iterable[str | None] = (),
                input_text: str | None = None) -> tuple[str, ...]:
        found: set[str] = set(self.by_example.get(example_id or "", ()))
        for rid in request_ids:
            found |= self.by_request.get(rid or "", set())
        if input_text:
            found |= self.by_input.get(normalise_text(input_text), set())
        return tuple(sorted(found))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for table in (self.by_example, self.by_request):
            for reasons in table.values():
                for r in reasons:
                    out[r] = out.get(r, 0) + 1
        return dict(sorted(out.items()))


def golden_items(spec: TaskSpec, predictions: Iterable[Mapping[str, Any]], prompt_version: str | None,
                 flags: Flags) -> tuple[list[RatingItem], dict[str, int]]:
    """Candidate against champion (else the 0-shot base model) on each golden prompt, from
    eval_report's predictions (one row per model and example)."""
    by_model: dict[str, dict[str, Mapping[str, Any]]] = {}
    for p in predictions:
        by_model.setdefault(p["model"], {})[p["example_id"]] = p
    candidate = next((m for m in by_model if m.startswith("candidate")), None)
    baseline = next((m for m in by_model if m.startswith("champion")), None) or \
        next((m for m in by_model if m.startswith("base (0-shot)")), None)
    skipped = {"identical_answers": 0, "no_baseline_answer": 0}
    if candidate is None or baseline is None:
        return [], skipped
    items = []
    for example_id, cand in by_model[candidate].items():
        base = by_model[baseline].get(example_id)
        if base is None:
            skipped["no_baseline_answer"] += 1
            continue
        if cand["prediction"] == base["prediction"]:
            skipped["identical_answers"] += 1
            continue
        reasons = flags.reasons(example_id=example_id)
        items.append(RatingItem(
            spec.name, "pairwise", "golden", cand["input"], cand["prediction"], model_name(spec.name, candidate),
            base["prediction"], model_name(spec.name, baseline), example_id=example_id,
            prompt_version=prompt_version, reference_json=json.dumps(cand["reference"], ensure_ascii=False),
            priority=float(len(reasons)), reasons=reasons))
    return items, skipped


@dataclass(frozen=True)
class LiveAnswer:
    request_id: str
    ts: Any
    adapter_version: str | None
    prompt_version: str | None
    input_text: str
    response_text: str


def live_items(spec: TaskSpec, answers: Sequence[LiveAnswer], flags: Flags,
               limit: int) -> tuple[list[RatingItem], dict[str, int]]:
    """Served answers grouped by input (normalised text): two versions -> a pairwise item of the
    two most recent versions' latest answers; otherwise a single item of the latest answer.
    Flagged inputs first, then the most recent; at most ``limit`` items."""
    groups: dict[str, list[LiveAnswer]] = {}
    for a in sorted(answers, key=lambda a: (a.ts is None, a.ts), reverse=True):  # newest first
        groups.setdefault(normalise_text(a.input_text), []).append(a)
    items = []
    counts = {"pairwise": 0, "single": 0}
    for group in groups.values():
        latest: dict[str, LiveAnswer] = {}
        for a in group:
            latest.setdefault(model_name(spec.name, a.adapter_version), a)
        versions = list(latest.items())
        first = versions[0][1]
        reasons = flags.reasons(request_ids=[a.request_id for a in group], input_text=first.input_text)
        other = next(((m, a) for m, a in versions[1:] if a.response_text != first.response_text), None)
        if other is not None:
            items.append(RatingItem(
                spec.name, "pairwise", "live", first.input_text, first.response_text, versions[0][0],
                other[1].response_text, other[0], request_id=first.request_id, prompt_version=first.prompt_version,
                priority=float(len(reasons)), reasons=reasons))
        else:
            items.append(RatingItem(
                spec.name, "single", "live", first.input_text, first.response_text, versions[0][0],
                request_id=first.request_id, prompt_version=first.prompt_version, priority=float(len(reasons)),
                reasons=reasons))
    items.sort(key=lambda i: -i.priority)  # stable: recency kept within a priority
    items = items[:limit]
    for i in items:
        counts[i.kind] += 1
    return items, counts


def gold_count(others: int, feedback) -> int:
    """Gold questions for a queue of ``others`` items: ``gold_share`` of the whole queue, and at
    least ``min_gold_answered`` so a rater's accuracy can be judged."""
    if feedback.gold_share <= 0:
        return 0
    share = math.ceil(others * feedback.gold_share / (1 - feedback.gold_share))
    return max(share, feedback.min_gold_answered, 1)


def gold_items(spec: TaskSpec, golden: Iterable[tuple[str, str, Mapping[str, Any]]], n: int,
               max_examples: int | None = None) -> list[RatingItem]:
    """``n`` gold questions from the golden examples ``(example_id, input_text, output)``: the
    reference against a corrupted copy, sides chosen by the probe id so the right choice is
    sometimes 1, sometimes 2."""
    if n <= 0:
        return []
    pairs = sorted(probe_pairs(golden, spec, limit=max_examples), key=lambda p: p.probe_id)[:n]
    items = []
    for p in pairs:
        good_first = int(p.probe_id[:2], 16) % 2 == 0
        r1, m1, r2, m2 = ((p.good, "reference", p.bad, f"corrupted:{p.kind}") if good_first
                          else (p.bad, f"corrupted:{p.kind}", p.good, "reference"))
        items.append(RatingItem(spec.name, "pairwise", "gold", p.input_text, r1, m1, r2, m2,
                                example_id=p.example_id, reference_json=p.good,
                                gold_choice="1" if good_first else "2"))
    return items
