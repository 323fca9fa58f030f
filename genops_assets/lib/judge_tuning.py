"""Training data of a tuned pairwise judge (the ``judge_adapter`` asset) and the key that names it.

A judge adapter learns from two sources:

- people's choices: rows of the ``human_judgements`` mart in split ``train`` (choices ``1``,
  ``2`` and ``tie``; ``both_bad`` says nothing about which answer is better and is left out);
- objective probes (``lib/probes.py``) built from the SFT train split: a reference answer
  against a corrupted copy of itself, where the better answer is known.

Never from golden items: the golden set certifies the judge (its probes and the ``certify``
human labels). An input found in the golden set, exactly or nearly (the word-set Jaccard rule
of the marts' golden-overlap check), raises ``GoldenLeakError`` before anything is trained.

Every pair is rendered with the task's pairwise rubric (``Rubric.render``, as AutoSxS and the
certificate ask the judge) in both orders, the target letter swapped with the order: a fixed
preference for one slot cannot lower the loss, so position bias is not learned. The target is
the choice letter alone, the first token of the assistant turn, which is where the server's
choice mode (``guided_choice``) reads the judge's probabilities.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from genops_assets.lib.hashing import sha256_json
from genops_assets.lib.judging import Rubric
from genops_assets.lib.probes import KINDS, probe_pairs
from genops_assets.lib.tasks import TaskSpec
from genops_assets.lib.training import SftExample
from genops_assets.lib.validation import jaccard, normalise_text, word_set

HUMAN_CHOICES = ("1", "2", "tie")
SKIPPED_CHOICES = ("both_bad",)
NO_REFERENCE = "(none)"  # what AutoSxS shows when a pair has no reference answer
HUMAN_COLUMNS = ("item_id", "input_text", "reference_json", "response_1", "response_2", "human_choice", "split")
TRAIN_SPLIT = "train"


class GoldenLeakError(ValueError):
    """Training data of the judge holds a golden-set input; the message names the rows."""


@dataclass(frozen=True)
class JudgePair:
    """Two answers to one input and which one is better (``1``, ``2`` or ``tie``)."""

    pair_id: str
    origin: str  # "human" or "probe:<kind>"
    input_text: str
    reference: str
    response_1: str
    response_2: str
    choice: str


def _text(value: Any) -> str | None:
    """A mart cell as text: None for SQL null (pandas gives None or NaN)."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def human_pairs(df) -> tuple[list[JudgePair], dict[str, int]]:
    """Pairs from rows of the ``human_judgements`` mart, split ``train`` only, and the count of
    rows left out by choice. A row of another split (the certify labels) is an error: the
    caller selects the train split, and nothing that certifies the judge may train it."""
    missing = [c for c in HUMAN_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"human_judgements: missing column(s) {missing} (has {list(df.columns)})")
    pairs: list[JudgePair] = []
    skipped: dict[str, int] = {}
    for row in df.to_dict(orient="records"):
        item = row["item_id"]
        if row["split"] != TRAIN_SPLIT:
            raise ValueError(f"human_judgements item {item}: split {row['split']!r} in the judge's training rows "
                             f"(only '{TRAIN_SPLIT}' rows train a judge; the others certify it)")
        choice = _text(row["human_choice"])
        if choice in SKIPPED_CHOICES:
            skipped[choice] = skipped.get(choice, 0) + 1
            continue
        if choice not in HUMAN_CHOICES:
            raise ValueError(f"human_judgements item {item}: human_choice {choice!r} is not one of "
                             f"{[*HUMAN_CHOICES, *SKIPPED_CHOICES]}")
        texts = {c: _text(row[c]) for c in ("input_text", "response_1", "response_2")}
        empty = [c for c, v in texts.items() if not v]
        if empty:
            raise ValueError(f"human_judgements item {item}: empty {empty}")
        pairs.append(JudgePair(f"human:{item}", "human", texts["input_text"], _text(row["reference_json"])
                               or NO_REFERENCE, texts["response_1"], texts["response_2"], choice))
    return pairs, skipped


def probe_training_pairs(examples: Iterable[tuple[str, str, Mapping[str, Any]]], spec: TaskSpec,
                         kinds: Sequence[str] = KINDS, seed: int = 0, limit: int | None = None,
                         show_reference: bool = False) -> list[JudgePair]:
    """Probe pairs (reference first, corrupted copy second, choice ``1``) from ``(example_id,
    input_text, output)`` rows of the SFT train split. ``show_reference``: the rubric's reference
    slot holds the reference answer (which is then the good answer verbatim) instead of
    "(none)"."""
    return [JudgePair(f"probe:{p.probe_id}", f"probe:{p.kind}", p.input_text,
                      p.good if show_reference else NO_REFERENCE, p.good, p.bad, "1")
            for p in probe_pairs(examples, spec, kinds=kinds, seed=seed, limit=limit)]


def golden_leaks(pairs: Sequence[JudgePair], golden_inputs: Sequence[str], near_jaccard: float) -> list[str]:
    """Pairs whose input is a golden input: the same text once normalised, or word sets at
    least ``near_jaccard`` alike (the marts' near-duplicate rule). One line per leak."""
    exact = {normalise_text(t): t for t in golden_inputs}
    golden_words = [word_set(n) for n in exact]
    leaks = []
    for p in pairs:
        norm = normalise_text(p.input_text)
        if norm in exact:
            leaks.append(f"{p.pair_id} ({p.origin}): input is a golden input")
            continue
        words = word_set(norm)
        score = max((jaccard(words, g) for g in golden_words), default=0.0)
        if score >= near_jaccard:
            leaks.append(f"{p.pair_id} ({p.origin}): input is a near copy of a golden input (Jaccard {score:.2f})")
    return leaks


def check_no_golden(pairs: Sequence[JudgePair], golden_inputs: Sequence[str], near_jaccard: float) -> None:
    leaks = golden_leaks(pairs, golden_inputs, near_jaccard)
    if leaks:
        raise GoldenLeakError(f"{len(leaks)} training pair(s) of the judge use golden-set inputs, which certify "
                              f"it and must never train it: " + "; ".join(leaks[:10])
                              + (" ..." if len(leaks) > 10 else ""))


def choice_letters(rubric: Rubric) -> tuple[str, str, str]:
    """The rubric's letters for: the first response, the second, a tie."""
    if rubric.kind != "pairwise" or len(rubric.choices) != 3:
        raise ValueError(f"rubric '{rubric.name}' ({rubric.source}) must be pairwise with three choices "
                         f"(first, second, tie) to train a judge; it is {rubric.kind} with {list(rubric.choices)}")
    first, second, tie = rubric.choices
    return first, second, tie


def judge_examples(rubric: Rubric, pairs: Sequence[JudgePair]) -> list[SftExample]:
    """Two examples per pair: responses in the pair's order, then swapped, the target letter
    swapped with them (a tie is the tie letter both ways)."""
    first, second, tie = choice_letters(rubric)
    letters = {"1": (first, second), "2": (second, first), "tie": (tie, tie)}
    out = []
    for p in pairs:
        if p.choice not in letters:
            raise ValueError(f"pair {p.pair_id}: choice {p.choice!r} is not one of {list(letters)}")
        in_order, swapped = letters[p.choice]
        out.append(SftExample(f"{p.pair_id}:12", rubric.render(input=p.input_text, reference=p.reference,
                                                               response_a=p.response_1, response_b=p.response_2),
                              in_order))
        out.append(SftExample(f"{p.pair_id}:21", rubric.render(input=p.input_text, reference=p.reference,
                                                               response_a=p.response_2, response_b=p.response_1),
                              swapped))
    return out


def split_pairs(pairs: Sequence[JudgePair], validation_fraction: float) -> tuple[list[JudgePair], list[JudgePair]]:
    """Train and validation pairs by a stable hash of the pair id (both orders of a pair stay together)."""
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    train, validation = [], []
    for p in pairs:
        bucket = int(sha256_json({"pair": p.pair_id})[:8], 16) / 0xFFFFFFFF
        (validation if bucket < validation_fraction else train).append(p)
    return train, validation


def pairs_digest(pairs: Sequence[JudgePair]) -> str:
    return sha256_json([asdict(p) for p in pairs])


@dataclass(frozen=True)
class JudgeTuningPlan:
    """What one judge training uses and the key that names it: same base model, rubric, pairs,
    config and code -> same key -> the registered version is reused."""

    train_pairs: list[JudgePair]
    validation_pairs: list[JudgePair]
    train: list[SftExample]
    validation: list[SftExample]
    counts: dict[str, int]
    digests: dict[str, str]
    version_key: str


def plan_judge_tuning(rubric: Rubric, human: Sequence[JudgePair], probes: Sequence[JudgePair],
                      golden_inputs: Sequence[str], near_jaccard: float, base_model_digest: str,
                      params: Mapping[str, Any], code_version: str, validation_fraction: float = 0.1,
                      max_train_pairs: int | None = None) -> JudgeTuningPlan:
    """Check the pairs against the golden set, split them (the train pairs capped at
    ``max_train_pairs``, for quick runs) and render both orders."""
    pairs = [*human, *probes]
    if not pairs:
        raise ValueError("no training pairs for the judge: no human choices in split train and no probe pairs")
    check_no_golden(pairs, golden_inputs, near_jaccard)
    train_pairs, validation_pairs = split_pairs(pairs, validation_fraction)
    if max_train_pairs:
        train_pairs = train_pairs[:max_train_pairs]
    if not train_pairs:
        raise ValueError(f"all {len(pairs)} pairs fell into validation (validation_fraction {validation_fraction})")
    counts = {"human_pairs": len(human), "probe_pairs": len(probes), "train_pairs": len(train_pairs),
              "validation_pairs": len(validation_pairs)}
    for p in pairs:
        counts[f"pairs_{p.origin}"] = counts.get(f"pairs_{p.origin}", 0) + 1
    digests = {"base_model": base_model_digest, "rubric": f"{rubric.name}@{rubric.version}",
               "human": pairs_digest(human), "probes": pairs_digest(probes),
               "train": pairs_digest(train_pairs), "validation": pairs_digest(validation_pairs)}
    key = sha256_json({**digests, "config": dict(params), "code": code_version,
                       "max_train_pairs": max_train_pairs})[:32]
    return JudgeTuningPlan(train_pairs, validation_pairs, judge_examples(rubric, train_pairs),
                           judge_examples(rubric, validation_pairs), counts, digests, key)


def pairs_frame(pairs: Sequence[JudgePair]):
    """The pairs as a DataFrame (MLflow dataset inputs)."""
    import pandas as pd

    return pd.DataFrame([asdict(p) for p in pairs], columns=[f for f in JudgePair.__dataclass_fields__])
