"""The rating store's raters and submissions: tokens, the queue, one rating per rater and item."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from genops_assets.lib.ratings import (
    AuthError,
    DuplicateRating,
    InvalidCorrection,
    InvalidRating,
    RaterExists,
    RatingItem,
    RatingStore,
    RetiredItem,
    UnknownItem,
    shown_first,
)
from genops_assets.lib.tasks import Feedback, load_task

REPO = Path(__file__).resolve().parents[1]
TASK = "support_triage"
GOOD = {"category": "billing", "priority": "high", "product": "cloud_plan",
        "summary": "Customer was charged twice for the cloud plan this month."}


@pytest.fixture()
def spec():
    return load_task(REPO / "tasks", TASK)


def pair(n: int, priority: float = 0.0, source: str = "golden", gold_choice: str | None = None) -> RatingItem:
    return RatingItem(task=TASK, kind="pairwise", source=source, input_text=f"message {n}",
                      response_1=json.dumps({**GOOD, "summary": f"answer one to message {n}."}),
                      model_1=f"{TASK}:v3", response_2=json.dumps({**GOOD, "priority": "low"}),
                      model_2=f"{TASK}:challenger", prompt_version="7", priority=priority, gold_choice=gold_choice)


def single(n: int) -> RatingItem:
    return RatingItem(task=TASK, kind="single", source="live", input_text=f"live message {n}",
                      response_1=json.dumps(GOOD), model_1=f"{TASK}:v3", request_id=f"req-{n}", prompt_version="7")


@pytest.fixture()
def store(tmp_path) -> RatingStore:
    return RatingStore(tmp_path / "feedback" / "ratings.sqlite")


def test_tokens_are_hashed_and_checked(store):
    token = store.add_rater("ana")
    store.authenticate("ana", token)
    with sqlite3.connect(store.path) as db:
        stored = db.execute("select token_sha256 from raters where name = 'ana'").fetchone()[0]
    assert token not in stored and len(stored) == 64
    for name, bad in (("ana", token + "x"), ("ana", ""), ("bob", token)):
        with pytest.raises(AuthError, match="unknown rater or wrong token"):
            store.authenticate(name, bad)
    with pytest.raises(RaterExists, match="'ana' exists"):
        store.add_rater("ana")
    rotated = store.add_rater("ana", rotate=True)
    with pytest.raises(AuthError):
        store.authenticate("ana", token)
    store.authenticate("ana", rotated)
    store.disable_rater("ana")
    with pytest.raises(AuthError):
        store.authenticate("ana", rotated)
    assert [(r["name"], r["disabled"], r["ratings"]) for r in store.list_raters()] == [("ana", 1, 0)]
    with pytest.raises(ValueError, match="rater name"):
        store.add_rater("no spaces please")
    with pytest.raises(ValueError, match="does not exist"):
        store.disable_rater("nobody")


def test_submit_copies_versions_and_refuses_a_second_rating(store, spec):
    store.add_rater("ana")
    item = pair(1)
    store.put_items(TASK, [item])
    row = store.submit(TASK, item.item_id, "ana", choice="2", shown_first="2", score_1=2, score_2=4,
                       unsafe_1=True, correction=json.dumps(GOOD), output_schema=spec.output_schema)
    assert (row["model_1"], row["model_2"], row["prompt_version"]) == (f"{TASK}:v3", f"{TASK}:challenger", "7")
    with pytest.raises(DuplicateRating, match="already rated"):
        store.submit(TASK, item.item_id, "ana", choice="1", output_schema=spec.output_schema)
    [stored] = store.ratings(TASK)
    assert (stored["choice"], stored["shown_first"], stored["score_1"], stored["score_2"]) == ("2", "2", 2, 4)
    assert (stored["unsafe_1"], stored["unsafe_2"], json.loads(stored["correction_json"])) == (1, 0, GOOD)


def test_bad_submissions_store_nothing(store, spec):
    store.add_rater("ana")
    p, s = pair(1), single(1)
    store.put_items(TASK, [p, s])
    schema = spec.output_schema
    with pytest.raises(InvalidCorrection) as bad_enum:
        store.submit(TASK, p.item_id, "ana", choice="1", correction={**GOOD, "priority": "asap"}, output_schema=schema)
    assert bad_enum.value.field == "priority" and "asap" in str(bad_enum.value)
    with pytest.raises(InvalidCorrection, match="not valid JSON"):
        store.submit(TASK, p.item_id, "ana", choice="1", correction="{category: billing", output_schema=schema)
    with pytest.raises(InvalidCorrection, match="summary"):
        store.submit(TASK, p.item_id, "ana", choice="1", correction={k: v for k, v in GOOD.items() if k != "summary"},
                     output_schema=schema)
    with pytest.raises(InvalidRating, match="choice must be one of"):
        store.submit(TASK, p.item_id, "ana", choice="A")
    with pytest.raises(InvalidRating, match="needs a score"):
        store.submit(TASK, s.item_id, "ana")
    with pytest.raises(InvalidRating, match="score_1 must be a whole number from 1 to 5"):
        store.submit(TASK, s.item_id, "ana", score_1=6)
    with pytest.raises(UnknownItem, match="it_nope"):
        store.submit(TASK, "it_nope", "ana", choice="1")
    with pytest.raises(UnknownItem):
        store.submit("product_qa", p.item_id, "ana", choice="1")
    with pytest.raises(AuthError):
        store.submit(TASK, p.item_id, "mallory", choice="1")
    store.put_items(TASK, [s])  # p leaves the queue
    with pytest.raises(RetiredItem, match="left the queue"):
        store.submit(TASK, p.item_id, "ana", choice="1")
    assert store.ratings(TASK) == []
    store.submit(TASK, s.item_id, "ana", score_1=4)
    assert [r["choice"] for r in store.ratings(TASK)] == [None]


def test_queue_order_cap_and_gold_share(store):
    raters = {name: store.add_rater(name) for name in ("ana", "bo", "cy")}
    items = [pair(n, priority=float(n)) for n in range(1, 10)]
    gold = pair(99, source="gold", gold_choice="1")
    store.put_items(TASK, [*items, gold])
    feedback = Feedback(ratings_per_item=2, gold_share=0.25)
    seen = []
    while (item := store.next_item(TASK, "ana", feedback)) is not None:
        seen.append(item["item_id"])
        store.submit(TASK, item["item_id"], "ana", choice="1")
    by_priority = [i.item_id for i in sorted(items, key=lambda i: -i.priority)]
    # the gold question fourth (a quarter of four ratings), the rest by priority
    assert seen == [*by_priority[:3], gold.item_id, *by_priority[3:]]
    assert store.progress(TASK, "ana", feedback).total == 10
    for item_id in by_priority[:4]:
        store.submit(TASK, item_id, "bo", choice="2")
    # two ratings each: the third rater gets the other items, and the gold question
    cy = store.progress(TASK, "cy", feedback)
    assert (cy.done, cy.remaining) == (0, 6)
    assert store.next_item(TASK, "cy", feedback)["item_id"] == by_priority[4]
    assert set(raters) == {r["name"] for r in store.list_raters()}


def test_everything_survives_a_restart(tmp_path, spec):
    path = tmp_path / "ratings.sqlite"
    first = RatingStore(path)
    token = first.add_rater("ana")
    item = pair(1)
    first.put_items(TASK, [item])
    first.submit(TASK, item.item_id, "ana", choice="tie", correction=GOOD, output_schema=spec.output_schema)
    again = RatingStore(path)
    again.authenticate("ana", token)
    assert [r["item_id"] for r in again.ratings(TASK)] == [item.item_id]
    assert again.next_item(TASK, "ana") is None
    assert again.progress(TASK, "ana").done == 1
    with pytest.raises(DuplicateRating):
        again.submit(TASK, item.item_id, "ana", choice="1")


def test_sides_are_stable_per_rater_and_item():
    ids = [pair(n).item_id for n in range(40)]
    sides = [shown_first("ana", i) for i in ids]
    assert sides == [shown_first("ana", i) for i in ids]
    assert set(sides) == {"1", "2"}
    assert any(shown_first("ana", i) != shown_first("bo", i) for i in ids)


def test_raters_command(tmp_path, monkeypatch, capsys):
    from genops_assets.cli.main import main

    monkeypatch.setenv("GENOPS_HOME", str(tmp_path))
    assert main(["raters", "add", "ana"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    store = RatingStore(tmp_path / "feedback" / "ratings.sqlite")
    store.authenticate("ana", token)
    assert main(["raters", "add", "ana"]) == 2
    assert "--rotate" in capsys.readouterr().err
    assert main(["raters", "disable", "ana"]) == 0
    assert main(["raters", "list"]) == 0
    assert re.search(r"^ana\s+disabled\s+0 ratings", capsys.readouterr().out, re.M)
    with pytest.raises(AuthError):
        store.authenticate("ana", token)
