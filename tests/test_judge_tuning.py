"""Training data of a tuned judge: both orders with swapped targets, never a golden input, and
a target that is exactly what the server's choice mode scores."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from genops_assets.lib.judge_tuning import (
    GoldenLeakError,
    JudgePair,
    human_pairs,
    judge_examples,
    plan_judge_tuning,
    probe_training_pairs,
)
from genops_assets.lib.judging import BUILTIN_RUBRICS, load_rubrics
from genops_assets.lib.tasks import load_task

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def spec():
    return load_task(REPO / "tasks", "support_triage")


@pytest.fixture(scope="module")
def rubric():
    return load_rubrics(BUILTIN_RUBRICS)["pairwise_quality"]


OUT = {"category": "billing", "priority": "high", "product": "app", "summary": "Customer was charged twice."}


def human_frame(rows):
    cols = ["item_id", "example_id", "input_text", "reference_json", "response_1", "response_2", "model_1",
            "model_2", "human_choice", "n_ratings", "agreement", "source", "split"]
    return pd.DataFrame([dict(zip(cols, r, strict=True)) for r in rows], columns=cols)


def hrow(item, text, choice, split="train", ref=None):
    return (item, None, text, ref, '{"category": "billing"}', '{"category": "other"}', "support_triage:v1", "base",
            choice, 3, 1.0, "live", split)


def test_both_orders_with_the_target_letter_swapped(rubric):
    pairs = [JudgePair("p1", "human", "my bill doubled", "(none)", "first answer", "second answer", "1"),
             JudgePair("p2", "human", "app crashes", '{"x": 1}', "one", "two", "2"),
             JudgePair("p3", "human", "hello there", "(none)", "same", "same too", "tie")]
    ex = judge_examples(rubric, pairs)
    assert [(e.example_id, e.target) for e in ex] == [("p1:12", "A"), ("p1:21", "B"), ("p2:12", "B"),
                                                      ("p2:21", "A"), ("p3:12", "C"), ("p3:21", "C")]
    # Exactly the rubric's rendering (what AutoSxS and the certificate send), responses swapped.
    assert ex[0].messages == rubric.render(input="my bill doubled", reference="(none)",
                                           response_a="first answer", response_b="second answer")
    assert ex[1].messages == rubric.render(input="my bill doubled", reference="(none)",
                                           response_a="second answer", response_b="first answer")
    assert '{"x": 1}' in ex[2].messages[1]["content"]
    # The better answer is the target in both orders: in slot A once and in slot B once.
    for e in ex[:4]:
        content = e.messages[1]["content"]
        better = {"p1": "first answer", "p2": "two"}[e.example_id[:2]]
        slot_a = content.index("Response A:")
        slot_b = content.index("Response B:")
        where = "A" if slot_a < content.index(better) < slot_b else "B"
        assert e.target == where


def test_human_rows_train_only_and_both_bad_left_out():
    pairs, skipped = human_pairs(human_frame([hrow("i1", "my bill doubled", "1"), hrow("i2", "app crash", "2"),
                                              hrow("i3", "door lock", "tie", ref='{"category": "x"}'),
                                              hrow("i4", "nothing works", "both_bad")]))
    assert [(p.pair_id, p.choice, p.reference) for p in pairs] == [
        ("human:i1", "1", "(none)"), ("human:i2", "2", "(none)"), ("human:i3", "tie", '{"category": "x"}')]
    assert skipped == {"both_bad": 1}
    with pytest.raises(ValueError, match="item i5: split 'certify' in the judge's training rows"):
        human_pairs(human_frame([hrow("i5", "my bill doubled", "1", split="certify")]))
    with pytest.raises(ValueError, match="item i6: human_choice 'A' is not one of"):
        human_pairs(human_frame([hrow("i6", "my bill doubled", "A")]))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['split'\]"):
        human_pairs(human_frame([hrow("i7", "x", "1")]).drop(columns=["split"]))


def test_probe_pairs_put_the_reference_first_and_balance_the_letters(spec, rubric):
    rows = [("e1", "I was charged twice for my plan this month", OUT),
            ("e2", "The hub light is blinking red since the update", {**OUT, "product": "hub"})]
    probes = probe_training_pairs(rows, spec)
    assert {p.origin for p in probes} == {"probe:wrong_label", "probe:broken_json", "probe:truncated"}
    assert all(p.choice == "1" and p.reference == "(none)" and json.loads(p.response_1) for p in probes)
    shown = probe_training_pairs(rows, spec, show_reference=True)
    assert all(p.reference == p.response_1 for p in shown)
    targets = Counter(e.target for e in judge_examples(rubric, probes))
    assert targets == {"A": len(probes), "B": len(probes)}  # no slot is ever the better bet


def test_a_golden_input_in_the_training_rows_raises(spec, rubric):
    golden = ["My thermostat keeps clicking on and off every two minutes", "Does the hub work with Hue bulbs?"]
    clean_human, _ = human_pairs(human_frame([hrow("i1", "my bill doubled this month", "1")]))
    probes = probe_training_pairs([("e1", "I was charged twice for my plan this month", OUT)], spec)
    args = dict(near_jaccard=0.8, base_model_digest="b", params={}, code_version="c")
    plan = plan_judge_tuning(rubric, clean_human, probes, golden, **args)
    assert plan.counts["human_pairs"] == 1 and plan.counts["probe_pairs"] == 3
    assert len(plan.train) + len(plan.validation) == 2 * 4

    leaked, _ = human_pairs(human_frame([hrow("i2", "does the HUB work with hue   bulbs?", "1")]))
    with pytest.raises(GoldenLeakError, match=r"human:i2 \(human\): input is a golden input"):
        plan_judge_tuning(rubric, [*clean_human, *leaked], probes, golden, **args)
    near = probe_training_pairs([("e9", "my thermostat keeps clicking on and off every two minutes!!", OUT)], spec)
    with pytest.raises(GoldenLeakError, match=r"probe:wrong_label\): input is a near copy of a golden input"):
        plan_judge_tuning(rubric, clean_human, near, golden, **args)


def test_same_inputs_same_version_key(spec, rubric):
    human, _ = human_pairs(human_frame([hrow("i1", "my bill doubled this month", "1")]))
    probes = probe_training_pairs([("e1", "I was charged twice for my plan this month", OUT)], spec)
    args = dict(golden_inputs=["other"], near_jaccard=0.8, base_model_digest="b", code_version="c")
    a = plan_judge_tuning(rubric, human, probes, params={"rank": 4}, **args)
    assert plan_judge_tuning(rubric, human, probes, params={"rank": 4}, **args).version_key == a.version_key
    assert plan_judge_tuning(rubric, human, probes, params={"rank": 8}, **args).version_key != a.version_key
    flipped, _ = human_pairs(human_frame([hrow("i1", "my bill doubled this month", "2")]))
    assert plan_judge_tuning(rubric, flipped, probes, params={"rank": 4}, **args).version_key != a.version_key
    with pytest.raises(ValueError, match="no training pairs"):
        plan_judge_tuning(rubric, [], [], params={}, **args)


def test_the_trained_target_is_the_token_choice_mode_scores(tokenizer_dir, rubric):
    """The assistant turn starts with the letter: the first labelled token is the choice token
    the server scores after the same prompt tokens (serving.scoring / kv_cache.encode)."""
    from transformers import AutoTokenizer

    from genops_assets.lib.training import IGNORE_INDEX, tokenize_example
    from genops_assets.serving.kv_cache import encode

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    pair = JudgePair("p", "human", "my bill doubled", "(none)", '{"a": 1}', '{"a": 2}', "2")
    for ex in judge_examples(rubric, [pair]):
        row = tokenize_example(tok, ex, 2048)
        prompt = encode(tok, ex.messages)
        assert row["input_ids"][: len(prompt)] == prompt
        first = row["labels"].index(next(x for x in row["labels"] if x != IGNORE_INDEX))
        assert first == len(prompt)
        assert [row["input_ids"][first]] == tok(ex.target, add_special_tokens=False)["input_ids"]
