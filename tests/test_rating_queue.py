"""What the rating queue holds: golden pairs from eval predictions, live pairs and singles, gold
questions, flagged prompts first (genops_assets/lib/rating_queue.py)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from genops_assets.lib.rating_queue import (
    DRIFT,
    JUDGE_DISAGREEMENT,
    ONLINE_QUALITY,
    Flags,
    LiveAnswer,
    gold_count,
    gold_items,
    golden_items,
    live_items,
    model_name,
)
from genops_assets.lib.tasks import Feedback, load_task

REPO = Path(__file__).resolve().parents[1]
REF = {"category": "billing", "priority": "low", "product": "mobile_app", "summary": "Customer asks about a charge."}


@pytest.fixture(scope="module")
def spec():
    return load_task(REPO / "tasks", "support_triage")


def test_model_names():
    assert model_name("t", "candidate v3") == "t:v3"
    assert model_name("t", "champion v12") == "t:v12"
    assert model_name("t", "2") == "t:v2"
    assert model_name("t", None) == model_name("t", "base (0-shot)") == "base"
    with pytest.raises(ValueError, match="cannot name the model"):
        model_name("t", "challenger")


def prediction(model: str, example_id: str, text: str) -> dict:
    return {"model": model, "example_id": example_id, "input": f"input {example_id}", "reference": REF,
            "prediction": text}


def test_golden_items_pair_candidate_and_champion(spec):
    preds = [prediction("base (0-shot)", "e1", "b1"), prediction("candidate v3", "e1", "c1"),
             prediction("champion v2", "e1", "h1"), prediction("candidate v3", "e2", "same"),
             prediction("champion v2", "e2", "same"), prediction("candidate v3", "e3", "c3")]
    flags = Flags()
    flags.add(JUDGE_DISAGREEMENT, example_id="e1")
    items, skipped = golden_items(spec, preds, "4", flags)
    assert skipped == {"identical_answers": 1, "no_baseline_answer": 1}
    (item,) = items
    assert (item.model_1, item.model_2, item.response_1, item.response_2) == ("support_triage:v3",
                                                                              "support_triage:v2", "c1", "h1")
    assert (item.source, item.example_id, item.prompt_version) == ("golden", "e1", "4")
    assert json.loads(item.reference_json) == REF
    assert item.reasons == (JUDGE_DISAGREEMENT,) and item.priority == 1.0
    # Without a champion the candidate meets the 0-shot base model.
    items, _ = golden_items(spec, [p for p in preds if not p["model"].startswith("champion")], None, Flags())
    assert [(i.example_id, i.model_2) for i in items] == [("e1", "base")]


def test_live_items_pairs_singles_and_flags_first(spec):
    t0 = datetime(2026, 1, 1)
    answers = [
        LiveAnswer("r1", t0, "1", "3", "My hub is offline", "old answer"),
        LiveAnswer("r2", t0 + timedelta(minutes=1), "2", "3", "my hub  is OFFLINE", "new answer"),
        LiveAnswer("r3", t0 + timedelta(minutes=2), None, "3", "refund please", "base answer"),
        LiveAnswer("r4", t0 + timedelta(minutes=3), "2", "3", "camera is dark", "cam answer"),
    ]
    flags = Flags()
    flags.add(DRIFT, request_id="r3", input_text="refund please")
    flags.add(ONLINE_QUALITY, request_id="r3")
    items, counts = live_items(spec, answers, flags, limit=10)
    assert counts == {"pairwise": 1, "single": 2}
    first, *rest = items
    assert (first.kind, first.request_id, first.model_1, first.reasons) == ("single", "r3", "base",
                                                                            (DRIFT, ONLINE_QUALITY))
    assert first.priority == 2.0
    pair = next(i for i in rest if i.kind == "pairwise")
    # Newest version first: v2's answer against v1's on the same (normalised) input.
    assert (pair.response_1, pair.model_1, pair.response_2, pair.model_2) == (
        "new answer", "support_triage:v2", "old answer", "support_triage:v1")
    assert [i.request_id for i in live_items(spec, answers, flags, limit=2)[0]] == ["r3", "r4"]


def test_gold_questions_know_their_answer(spec):
    golden = [(f"ex_{i}", f"question {i}", {**REF, "summary": f"Customer asks about charge number {i}."})
              for i in range(6)]
    items = gold_items(spec, golden, 8)
    assert len(items) == 8 and all(i.source == "gold" for i in items)
    for i in items:
        right = i.response_1 if i.gold_choice == "1" else i.response_2
        wrong = i.response_2 if i.gold_choice == "1" else i.response_1
        assert right == i.reference_json and json.loads(right)["product"] == "mobile_app"
        assert wrong != right
        assert {i.model_1, i.model_2} & {"reference"} and any(m.startswith("corrupted:") for m in (i.model_1,
                                                                                                  i.model_2))
    assert {i.gold_choice for i in items} == {"1", "2"}, "the right answer is not always on one side"
    assert [i.item_id for i in gold_items(spec, golden, 8)] == [i.item_id for i in items], "deterministic"


def test_gold_share():
    fb = Feedback(gold_share=0.1, min_gold_answered=2)
    assert gold_count(0, fb) == 2  # enough to judge a rater
    assert gold_count(90, fb) == 10  # 10 of 100
    assert gold_count(90, Feedback(gold_share=0.0)) == 0
