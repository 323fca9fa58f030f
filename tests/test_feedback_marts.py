"""People's ratings through the warehouse into the feedback marts and the SFT data (dbt-duckdb)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from rating_rows import add_ratings

from genops_assets.defs.feedback.ratings import copy_ratings
from genops_assets.lib.agreement import agreed_pairs, hash_bucket, pair_id
from genops_assets.lib.ratings import RatingItem, RatingStore
from genops_assets.lib.tasks import Feedback
from resources import DBT_PROJECT_DIR, dbt_executable
from resources.warehouse import DuckDBWarehouse

pytestmark = pytest.mark.server

TASK = "t"
OUT = json.dumps({"category": "billing", "summary": "Customer asks about a charge."})
FIX = json.dumps({"category": "shipping", "summary": "Customer reports a late parcel."})


def _build(db: Path, tmp: Path) -> None:
    env = {**os.environ, "GENOPS_DUCKDB_PATH": str(db)}
    args = [dbt_executable(), "build", "--project-dir", str(DBT_PROJECT_DIR), "--profiles-dir", str(DBT_PROJECT_DIR),
            "--target-path", str(tmp / "target"), "--log-path", str(tmp / "logs"),
            "--vars", json.dumps({"task": TASK, "golden_fraction": 0.3, "heldout_fraction": 0.2})]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def _messages() -> list[str]:
    words = ["thermostat", "camera", "doorbell", "hub", "refund", "parcel", "login", "invoice", "battery",
             "firmware", "router", "motion", "storage", "account", "locked", "update"]
    return [f"case {i}: " + " ".join(words[(i + k) % len(words)] for k in range(0, 16, 3)) + f" order {i * 7}"
            for i in range(40)]


def test_marts_build_empty_then_from_ratings(tmp_path):
    wh = DuckDBWarehouse(path=str(tmp_path / "w.duckdb"))
    messages = _messages()
    wh.replace_raw_examples(TASK, [("examples.jsonl", i + 1, m, OUT) for i, m in enumerate(messages)])
    _build(Path(wh.path), tmp_path)  # no feedback tables at all: the marts exist, empty
    for mart in ("preference_pairs", "human_corrections", "human_judgements", "golden_proposals"):
        assert wh.query_df(f"select count(*) as n from marts_t.{mart}")["n"][0] == 0
    sft = wh.query_df("select * from marts_t.sft_dataset")
    assert set(sft["origin"]) == {"task_data"}

    golden_text = wh.query_df("select input_text from marts_t.golden_eval_dataset limit 1")["input_text"][0]
    train_text = sft[sft["split"] == "train"]["input_text"].iloc[0]

    store = RatingStore(tmp_path / "ratings.sqlite")

    def pair(source, text, gold=None, **kw):
        return RatingItem(TASK, "pairwise", source, text, OUT, "t:v2", FIX, "t:v1", gold_choice=gold, **kw)

    live = pair("live", "my parcel never came and the tracking page is blank", request_id="q1")
    near_golden = pair("live", "  " + golden_text.upper() + " ", request_id="q2")  # a golden input, sent live
    golden = pair("golden", golden_text, example_id="ex_g")
    gold1, gold2 = pair("gold", "probe one", gold="1"), pair("gold", "probe two", gold="2")
    new_input = RatingItem(TASK, "single", "live", "where is my parcel, it is two weeks late", OUT, "t:v2",
                           request_id="q3")
    known_input = RatingItem(TASK, "single", "live", train_text, OUT, "t:v2", request_id="q4")
    items = [live, near_golden, golden, gold1, gold2, new_input, known_input]
    store.put_items(TASK, items)
    add_ratings(store, TASK, [
        *[(i.item_id, r, "2") for i in (live, near_golden, golden) for r in "ab"],
        *[(g.item_id, r, g.gold_choice) for g in (gold1, gold2) for r in "ab"],
        # c fails both gold questions: excluded, so neither c's choice nor c's correction counts.
        (gold1.item_id, "c", "2"), (gold2.item_id, "c", "1"), (live.item_id, "c", "1"),
        (known_input.item_id, "c", None, json.dumps({"category": "billing", "summary": "Careless rater's text."})),
        (new_input.item_id, "a", None, FIX), (new_input.item_id, "b", None, FIX),
        (known_input.item_id, "a", None, FIX),
    ])
    feedback = Feedback(heldout_fraction=0.2)
    report, written = copy_ratings(wh, TASK, store.items(TASK), store.ratings(TASK), feedback)
    assert written["rating_items"] == len(items) and written["ratings"] == 17
    assert [r.rater for r in report.raters if r.excluded] == ["c"]
    _build(Path(wh.path), tmp_path)

    pairs = wh.query_df("select * from marts_t.preference_pairs order by item_id").set_index("item_id")
    assert set(pairs.index) == {live.item_id, near_golden.item_id, golden.item_id}  # gold never, singles never
    row = pairs.loc[live.item_id]
    assert (row.chosen_json, row.rejected_json, row.chosen_model, row.rejected_model) == (FIX, OUT, "t:v1", "t:v2")
    assert row.pair_id == pair_id(live.item_id, "2")
    assert (row.n_ratings, row.agreement) == (2, 1.0)  # c's opposite choice does not count
    assert row.split == ("heldout" if hash_bucket(live.item_id) < 0.2 else "train")
    assert pairs.loc[golden.item_id].split == "heldout"
    assert pairs.loc[near_golden.item_id].split == "heldout", "a golden input sent live never trains"
    # The store-only view the sensor uses agrees with the mart on every pair but the near-golden one.
    from_store = {p.pair_id: p.split for p in agreed_pairs(store, SimpleNamespace(name=TASK, feedback=feedback))}
    assert from_store[row.pair_id] == row.split

    corrections = wh.query_df("select * from marts_t.human_corrections")
    assert sorted(corrections["rater"]) == ["a", "a", "b"]

    judgements = wh.query_df("select * from marts_t.human_judgements").set_index("item_id")
    assert judgements.loc[gold1.item_id].split == "certify" and judgements.loc[golden.item_id].split == "certify"
    assert judgements.loc[gold2.item_id].human_choice == "2"

    sft = wh.query_df("select * from marts_t.sft_dataset").set_index("input_text")
    assert sft.loc[train_text].output_json == FIX and sft.loc[train_text].origin == "human_correction"
    added = sft.loc["where is my parcel, it is two weeks late"]
    assert (added.split, added.origin, added.output_json) == ("train", "human_correction", FIX)
    assert golden_text not in sft.index

    proposals = wh.query_df("select * from marts_t.golden_proposals")
    # new_input: a and b wrote the same correction; known_input: only a (c is excluded).
    assert list(proposals["item_id"]) == [new_input.item_id]
    assert (proposals["n_raters"][0], proposals["output_json"][0]) == (2, FIX)



def test_golden_additions_always_join_the_golden_set(tmp_path):
    wh = DuckDBWarehouse(path=str(tmp_path / "w.duckdb"))
    messages = _messages()
    rows = [("examples.jsonl", i + 1, m, OUT) for i, m in enumerate(messages)]
    _build_with(wh, tmp_path, rows)
    sft_text = wh.query_df("select input_text from marts_t.sft_dataset order by example_id limit 1")["input_text"][0]
    # An accepted proposal repeating a training example, and a new one: both golden, the duplicate
    # leaves the SFT data (the golden addition comes first in load order).
    additions = [("golden_additions.jsonl", 1, sft_text, FIX), ("golden_additions.jsonl", 2, "brand new input", FIX)]
    _build_with(wh, tmp_path, rows + additions)
    golden = wh.query_df("select * from marts_t.golden_eval_dataset").set_index("input_text")
    assert {sft_text, "brand new input"} <= set(golden.index)
    assert golden.loc[sft_text].source_file == "golden_additions.jsonl" and golden.loc[sft_text].output_json == FIX
    assert sft_text not in set(wh.query_df("select input_text from marts_t.sft_dataset")["input_text"])


def _build_with(wh: DuckDBWarehouse, tmp: Path, rows: list[tuple]) -> None:
    wh.replace_raw_examples(TASK, rows)
    _build(Path(wh.path), tmp)
