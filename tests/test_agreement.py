"""Annotator agreement (genops_assets/lib/agreement.py) against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import pytest
from rating_rows import add_ratings

from genops_assets.lib.agreement import (
    agreed_pairs,
    agreement_report,
    cohen_kappa,
    fleiss_kappa,
    hash_bucket,
    item_agreement,
    overall_kappa,
    pair_id,
    rater_quality,
)
from genops_assets.lib.ratings import RatingItem, RatingStore
from genops_assets.lib.tasks import Feedback, load_task

REPO = Path(__file__).resolve().parents[1]
FEEDBACK = Feedback(min_item_ratings=2, min_item_agreement=0.66, min_gold_accuracy=0.75, min_gold_answered=2,
                    heldout_fraction=0.2)


def item(item_id: str, kind: str = "pairwise", source: str = "live", gold: str | None = None) -> dict:
    return {"item_id": item_id, "kind": kind, "source": source, "gold_choice": gold, "input_text": f"q {item_id}",
            "response_1": f"a1 {item_id}", "response_2": f"a2 {item_id}", "model_1": "t:v1", "model_2": "t:v2"}


def rating(item_id: str, rater: str, choice: str | None, ts: int = 0) -> dict:
    return {"item_id": item_id, "rater": rater, "choice": choice, "ts": f"2026-01-01T00:00:{ts:02d}"}


def grid(choices: dict[str, str]) -> list[dict]:
    """``{"x1": "abc"...}``-style helper: each rater's choice per item, raters in fixed order."""
    out = []
    for k, (item_id, row) in enumerate(choices.items()):
        for rater, choice in row.items():
            out.append(rating(item_id, rater, choice, ts=k))
    return out


def test_cohen_kappa_two_raters_by_hand():
    # a: 1 1 2 2, b: 1 2 2 2. Observed agreement po = 3/4.
    # a picks 1 half the time, b a quarter: pe = .5*.25 + .5*.75 = .5.
    # kappa = (.75 - .5) / (1 - .5) = 0.5.
    items = [item(f"x{i}") for i in range(1, 5)]
    ratings = grid({"x1": {"a": "1", "b": "1"}, "x2": {"a": "1", "b": "2"},
                    "x3": {"a": "2", "b": "2"}, "x4": {"a": "2", "b": "2"}})
    kappa, method, n = overall_kappa(items, ratings)
    assert (method, n) == ("cohen", 4)
    assert kappa == pytest.approx(0.5)
    assert cohen_kappa(["1", "1", "2", "2"], ["1", "2", "2", "2"]) == pytest.approx(0.5)


def test_fleiss_kappa_by_hand():
    # 4 items, 3 raters each, choices 1/2: (1,1,1) (1,1,2) (2,2,2) (1,2,2).
    # Per item P_i = (sum n_ij^2 - n) / (n (n-1)) with n = 3: 1, (4+1-3)/6 = 1/3, 1, 1/3 -> mean 2/3.
    # Category shares: p1 = 6/12 = .5, p2 = .5 -> Pe = .25 + .25 = .5.
    # kappa = (2/3 - .5) / (1 - .5) = 1/3.
    table = [["1", "1", "1"], ["1", "1", "2"], ["2", "2", "2"], ["1", "2", "2"]]
    assert fleiss_kappa(table) == pytest.approx(1 / 3)
    assert fleiss_kappa([["1", "1"], ["1", "1"]]) is None  # one category only: not defined
    assert fleiss_kappa([["1", "2", "2"]]) is None  # one item
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa([["1", "2"], ["1", "2", "2"]])


# Raters a, b, c on x1..x4, plus a careless d who answers "1" everywhere. Gold questions g1, g2
# (right answer "2" for both): a and b get both right, c one of two, d none.
THREE = {"x1": {"a": "1", "b": "1", "c": "1", "d": "1"},
         "x2": {"a": "1", "b": "2", "c": "2", "d": "1"},
         "x3": {"a": "2", "b": "2", "c": "2", "d": "1"},
         "x4": {"a": "2", "b": "2", "c": "2", "d": "1"}}


def three_raters():
    items = [item(f"x{i}") for i in range(1, 5)] + [item("g1", source="gold", gold="2"),
                                                    item("g2", source="gold", gold="2")]
    ratings = grid(THREE) + grid({"g1": {"a": "2", "b": "2", "c": "2", "d": "1"},
                                  "g2": {"a": "2", "b": "2", "c": "1", "d": "tie"}})
    return items, ratings


def test_gold_failures_exclude_a_rater_and_fleiss_uses_the_rest():
    items, ratings = three_raters()
    report = agreement_report("t", items, ratings, FEEDBACK)
    q = {r.rater: r for r in report.raters}
    # d: 0 of 2 gold right -> excluded; c: 1 of 2 = 0.5 < 0.75 -> excluded too.
    assert (q["d"].excluded, q["d"].gold_answered, q["d"].gold_accuracy) == (True, 2, 0.0)
    assert "gold accuracy 0.00 < 0.75" in q["d"].reason
    assert (q["c"].excluded, q["c"].gold_accuracy) == (True, 0.5)
    assert (q["a"].excluded, q["a"].gold_accuracy, q["a"].reason) == (False, 1.0, None)
    # Only a and b remain: Cohen on x1..x4, a = 1 1 2 2, b = 1 2 2 2 -> 0.5 (as above).
    assert report.kappa_method == "cohen"
    assert report.kappa == pytest.approx(0.5)
    # Items: x2 has a=1, b=2 -> no majority, excluded; the rest agree fully.
    by_item = {i.item_id: i for i in report.items}
    assert by_item["x2"].included is False and by_item["x2"].reason.startswith("no majority")
    assert (by_item["x3"].n_ratings, by_item["x3"].majority_choice, by_item["x3"].agreement) == (2, "2", 1.0)
    md = report.markdown()
    assert "excluded 2" in md and "gold accuracy 0.00 < 0.75" in md and "no majority (tie): 1" in md


def test_fleiss_and_per_rater_kappa_with_three_included_raters():
    items, ratings = three_raters()
    lenient = Feedback(**{**FEEDBACK.model_dump(), "min_gold_accuracy": 0.5})  # c (0.5) stays, d (0.0) goes
    report = agreement_report("t", items, ratings, lenient)
    q = {r.rater: r for r in report.raters}
    assert [r for r in q if q[r].excluded] == ["d"]
    # Fleiss over x1..x4 with a, b, c: (1,1,1) (1,2,2) (2,2,2) (2,2,2).
    # P_i: 1, 1/3, 1, 1 -> mean 5/6; p1 = 4/12 = 1/3, p2 = 2/3 -> Pe = 1/9 + 4/9 = 5/9.
    # kappa = (5/6 - 5/9) / (1 - 5/9) = (5/18) / (8/18) = 0.625. d's ratings do not count.
    assert report.kappa_method.startswith("fleiss")
    assert report.kappa == pytest.approx(0.625)
    # a against the majority of b and c: a = 1 1 2 2, others = 1 2 2 2 -> 0.5 (the Cohen case).
    assert q["a"].kappa == pytest.approx(0.5)
    # b against a and c: x2 has a=1, c=2, a tie, so it is left out; b = 1 2 2 = others -> 1.0.
    assert q["b"].kappa == pytest.approx(1.0)
    # x2: b and c chose 2, a chose 1 -> majority 2 with 2/3 >= 0.66: included.
    x2 = next(i for i in report.items if i.item_id == "x2")
    assert (x2.n_ratings, x2.majority_choice, x2.included) == (3, "2", True)
    assert x2.agreement == pytest.approx(2 / 3)


def test_item_rule_ties_and_too_few_ratings():
    items = [item("y1"), item("y2"), item("y3"), item("s1", kind="single")]
    ratings = [rating("y1", "a", "1"), rating("y1", "b", "2"),          # tie between answers
               rating("y2", "a", "tie"), rating("y2", "b", "tie"),      # people agree it is a tie
               rating("y3", "a", "1"),                                   # one rating only
               rating("s1", "a", None)]
    rows = {i.item_id: i for i in item_agreement("t", items, ratings, FEEDBACK)}
    assert set(rows) == {"y1", "y2", "y3"}  # single items have no choice to agree on
    assert rows["y1"].included is False and rows["y1"].majority_choice is None
    assert (rows["y2"].included, rows["y2"].majority_choice) == (True, "tie")
    assert rows["y3"].reason == "1 rating(s) < 2 needed"
    strict = Feedback(**{**FEEDBACK.model_dump(), "min_item_agreement": 0.9})
    three = [rating("y1", r, c) for r, c in (("a", "1"), ("b", "1"), ("c", "2"))]
    (y1,) = [i for i in item_agreement("t", items, three, strict) if i.item_id == "y1"]
    assert (y1.included, y1.reason) == (False, "agreement 0.67 < 0.90")


def test_kappa_not_computed_without_shared_items():
    items = [item("x1"), item("x2")]
    report = agreement_report("t", items, [rating("x1", "a", "1"), rating("x2", "b", "2")], FEEDBACK)
    assert report.kappa is None and report.kappa_method.startswith("not computed")
    assert [r.kappa for r in report.raters] == [None, None]
    assert "not computed" in report.markdown()
    empty = agreement_report("t", [], [], FEEDBACK)
    assert (empty.raters, empty.items, empty.kappa) == ([], [], None)
    assert rater_quality("t", [], [], FEEDBACK) == []


def test_hash_bucket_is_stable_and_in_range():
    assert hash_bucket("it_abc") == hash_bucket("it_abc")
    assert 0 <= hash_bucket("it_abc") < 1
    # sha256("it_abc") starts with the hex below; its first 8 hex digits over 2**32.
    import hashlib

    head = hashlib.sha256(b"it_abc").hexdigest()[:8]
    assert hash_bucket("it_abc") == int(head, 16) / 2**32


def test_agreed_pairs_from_the_store(tmp_path):
    spec = load_task(REPO / "tasks", "support_triage")
    store = RatingStore(tmp_path / "ratings.sqlite")
    live = RatingItem("support_triage", "pairwise", "live", "my hub is offline", '{"a": 1}', "support_triage:v2",
                      '{"a": 2}', "support_triage:v1", request_id="req-1")
    golden = RatingItem("support_triage", "pairwise", "golden", "golden question", '{"b": 1}', "support_triage:v2",
                        '{"b": 2}', "base", example_id="ex_1")
    gold = RatingItem("support_triage", "pairwise", "gold", "probe", '{"c": 1}', "reference", '{"c"',
                      "corrupted:broken_json", gold_choice="1")
    store.put_items("support_triage", [live, golden, gold])
    assert agreed_pairs(store, spec) == []  # no ratings: no pairs, no error
    add_ratings(store, "support_triage", [
        (live.item_id, "a", "2"), (live.item_id, "b", "2"), (golden.item_id, "a", "1"), (golden.item_id, "b", "1"),
        (gold.item_id, "a", "1"), (gold.item_id, "b", "1")])
    pairs = {p.item_id: p for p in agreed_pairs(store, spec)}
    assert set(pairs) == {live.item_id, golden.item_id}  # the gold question is never a training pair
    p = pairs[live.item_id]
    assert (p.chosen, p.rejected, p.chosen_model, p.rejected_model) == ('{"a": 2}', '{"a": 1}', "support_triage:v1",
                                                                         "support_triage:v2")
    assert p.pair_id == pair_id(live.item_id, "2")
    assert p.split == ("heldout" if hash_bucket(live.item_id) < spec.feedback.heldout_fraction else "train")
    assert pairs[golden.item_id].split == "heldout"  # golden-set prompts never train
