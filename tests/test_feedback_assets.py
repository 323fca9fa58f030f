"""The rating assets in process: human_ratings writes the feedback tables (empty without
ratings) with its agreement report; the queue's flags come from what monitoring and AutoSxS stored."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
from rating_rows import add_ratings

from genops_assets.defs.feedback.ratings import build_rating_assets, live_answers, queue_flags
from genops_assets.lib.rating_queue import DRIFT, JUDGE_DISAGREEMENT, ONLINE_QUALITY
from genops_assets.lib.ratings import RatingItem, RatingStore
from genops_assets.lib.tasks import TaskRef
from resources.feedback_store import DuckDBFeedbackStore
from resources.paths import GenopsHome
from resources.warehouse import DuckDBWarehouse

REPO = Path(__file__).resolve().parents[1]
TASK = TaskRef("support_triage", str(REPO / "tasks"))
TABLES = ("rating_items", "ratings", "rater_quality", "item_agreement")


def materialize(home: GenopsHome, wh: DuckDBWarehouse):
    human = build_rating_assets(TASK)[1]
    result = dg.materialize([human], resources={"home": home, "warehouse": wh})
    assert result.success
    return {tuple(m.asset_key.path): m.metadata for m in result.asset_materializations_for_node(
        "support_triage__human_ratings")}


def test_human_ratings_without_and_with_ratings(tmp_path):
    home, wh = GenopsHome(root=str(tmp_path / "home")), DuckDBWarehouse(path=str(tmp_path / "w.duckdb"))
    meta = materialize(home, wh)
    assert set(meta) == {("support_triage", n) for n in ("human_ratings", "rating_items", "rater_quality",
                                                         "item_agreement")}
    for table in TABLES:
        assert wh.query_df(f"select count(*) as n from feedback.{table}")["n"][0] == 0
    report = meta[("support_triage", "human_ratings")]
    assert report["kappa"].value == "not computed" and report["agreed_pairs"].value == 0

    store = RatingStore(home.ratings_path)
    items = [RatingItem("support_triage", "pairwise", "live", f"question {i}", '{"a": 1}', "support_triage:v2",
                        '{"a": 2}', "support_triage:v1") for i in range(4)]
    gold = [RatingItem("support_triage", "pairwise", "gold", f"probe {i}", '{"g": 1}', "reference", '{"g"',
                       "corrupted:broken_json", gold_choice="1") for i in range(2)]
    store.put_items("support_triage", [*items, *gold])
    # ana and ben agree on 3 of 4 pairs; cy misses both gold questions.
    add_ratings(store, "support_triage", [
        *[(i.item_id, r, "1") for i in items[:3] for r in ("ana", "ben")],
        (items[3].item_id, "ana", "1"), (items[3].item_id, "ben", "2"),
        *[(g.item_id, r, c) for g in gold for r, c in (("ana", "1"), ("ben", "1"), ("cy", "2"))],
        *[(i.item_id, "cy", "2") for i in items],
    ])
    meta = materialize(home, wh)
    report = meta[("support_triage", "human_ratings")]
    md = report["agreement_report"].value
    assert "| cy | 6 | 2 | 0.000 |" in md and "gold accuracy 0.00 < 0.75" in md
    # ana 1 1 1 1, ben 1 1 1 2 over the four pairs: po = 3/4, pe = 1*.75 + 0*.25 = .75 -> kappa 0.
    assert report["kappa"].value == 0.0 and report["kappa_method"].value == "cohen"
    assert report["excluded_raters"].value == 1 and report["agreed_pairs"].value == 3
    quality = wh.query_df("select * from feedback.rater_quality order by rater")
    assert quality["excluded"].tolist() == [False, False, True]
    agreement = wh.query_df("select * from feedback.item_agreement where not included")
    assert len(agreement) == 1 and agreement["reason"][0].startswith("no majority")
    assert wh.query_df("select count(*) as n from feedback.ratings")["n"][0] == 18


def test_queue_flags_from_stored_outputs(tmp_path):
    wh = DuckDBWarehouse(path=str(tmp_path / "w.duckdb"))
    assert queue_flags(wh, "support_triage", None).counts() == {}  # nothing stored yet: no flags
    assert live_answers(DuckDBFeedbackStore(warehouse=wh), "support_triage", 10) == []
    wh.execute("create schema monitoring_support_triage")
    wh.execute("create table monitoring_support_triage.flagged_prompts as "
               "select 'r1' as request_id, 'odd question' as input_text")
    wh.execute("create table monitoring_support_triage.online_quality as select * from (values "
               "('d', 'live', '2', 'r2', 'q', 2.0), ('d', 'live', '2', 'r3', 'q', 4.5), ('d', 'offline', '2', "
               "'ex_1', 'q', 4.0)) t(partition_key, side, version, item_id, rubric, score)")
    wh.execute("create table monitoring_support_triage.online_quality_summary as "
               "select 'd' as partition_key, '2' as version, 'q' as rubric, 4.0 as offline_mean")
    rows = tmp_path / "sxs_rows.jsonl"
    rows.write_text(json.dumps({"example_id": "ex_7", "consistent": False}) + "\n"
                    + json.dumps({"example_id": "ex_8", "consistent": True}) + "\n")
    flags = queue_flags(wh, "support_triage", rows)
    assert flags.reasons(request_ids=["r1"]) == (DRIFT,)
    assert flags.reasons(input_text="ODD  question") == (DRIFT,)
    assert flags.reasons(request_ids=["r2"]) == (ONLINE_QUALITY,) and flags.reasons(request_ids=["r3"]) == ()
    assert flags.reasons(example_id="ex_7") == (JUDGE_DISAGREEMENT,) and flags.reasons(example_id="ex_8") == ()
