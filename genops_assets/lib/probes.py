"""Objective probes: a reference answer against a corrupted copy of itself, where the better
answer is known without asking anyone.

Three corruptions of a reference output object:

- ``wrong_label``: one label field set to another value the schema allows (its ``enum``);
- ``broken_json``: the serialised answer with its closing brace and last quote removed;
- ``truncated``: the serialised answer cut to half its length.

A judge that cannot tell the reference from these is not measuring quality. The same pairs
serve as gold questions in the rating queue (a careless rater misses them) and as training
pairs of a tuned judge (built from the SFT split, never from the golden items that certify it).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from genops_assets.lib.hashing import sha256_json
from genops_assets.lib.tasks import TaskSpec

KINDS = ("wrong_label", "broken_json", "truncated")


@dataclass(frozen=True)
class ProbePair:
    """``good`` is the reference answer, ``bad`` its corrupted copy (both as the model would write them)."""

    probe_id: str
    example_id: str
    input_text: str
    good: str
    bad: str
    kind: str


def answer_text(output: Mapping[str, Any]) -> str:
    """An output object written as the models write answers: compact JSON, schema order kept."""
    return json.dumps(dict(output), ensure_ascii=False)


def _enum_values(spec: TaskSpec, field: str) -> list[Any]:
    prop = spec.schema.get("properties", {}).get(field, {})
    return list(prop.get("enum") or [])


def corrupt(output: Mapping[str, Any], spec: TaskSpec, kind: str, rng: random.Random) -> str | None:
    """The corrupted answer text, or None when this corruption does not apply to ``output``
    (no label field with another allowed value; an answer too short to truncate)."""
    text = answer_text(output)
    if kind == "wrong_label":
        fields = [f for f in spec.label_fields if len([v for v in _enum_values(spec, f) if v != output.get(f)]) > 0]
        if not fields:
            return None
        field = rng.choice(sorted(fields))
        others = [v for v in _enum_values(spec, field) if v != output.get(field)]
        return answer_text({**output, field: rng.choice(others)})
    if kind == "broken_json":
        cut = text.rstrip("}")
        if cut.endswith('"'):
            cut = cut[:-1]
        return cut if cut != text else None
    if kind == "truncated":
        return text[: len(text) // 2] if len(text) >= 8 else None
    raise ValueError(f"unknown corruption '{kind}' (known: {KINDS})")


def probe_pairs(examples: Iterable[tuple[str, str, Mapping[str, Any]]], spec: TaskSpec,
                kinds: Sequence[str] = KINDS, seed: int = 0, limit: int | None = None) -> list[ProbePair]:
    """One pair per example and applicable corruption, from ``(example_id, input_text, output)``
    rows (sorted by example id, the first ``limit`` examples). Deterministic for a seed."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown corruption(s) {unknown} (known: {KINDS})")
    rows = sorted(examples, key=lambda r: r[0])
    if limit is not None:
        rows = rows[:limit]
    pairs: list[ProbePair] = []
    for example_id, input_text, output in rows:
        if not isinstance(output, Mapping):
            raise ValueError(f"example {example_id}: the reference output must be an object, "
                             f"got {type(output).__name__}")
        rng = random.Random(f"{seed}:{example_id}")
        for kind in kinds:
            bad = corrupt(output, spec, kind, rng)
            if bad is None:
                continue
            good = answer_text(output)
            pairs.append(ProbePair(sha256_json({"example_id": example_id, "kind": kind, "bad": bad})[:16],
                                   example_id, input_text, good, bad, kind))
    return pairs
