"""The dbt-duckdb project on its own: dedup, stable ids, a held-out golden set that nothing
near it leaves, a stable split, and a few-shot pool."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from genops_assets.lib.validation import jaccard, normalise_text, word_set
from resources import DBT_PROJECT_DIR, dbt_executable
from resources.warehouse import DuckDBWarehouse

pytestmark = pytest.mark.server

WORDS = [
    "thermostat", "camera", "doorbell", "hub", "app", "plan", "charge", "refund", "parcel", "login",
    "password", "offline", "crash", "invoice", "battery", "screen", "firmware", "wifi", "router", "order",
    "box", "broken", "late", "missing", "cold", "warm", "night", "motion", "alert", "recording", "storage",
    "monthly", "yearly", "account", "email", "code", "locked", "update", "reset",
]
CATS = ["billing", "shipping", "technical_issue", "general_inquiry"]


def _messages(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.sample(WORDS, 12)) + f" case {seed}-{i}" for i in range(n)]


def _rows(messages: list[str], source: str = "examples.jsonl") -> list[tuple]:
    return [(source, i + 1, m, json.dumps({"category": CATS[i % 4], "summary": "Customer writes in."}))
            for i, m in enumerate(messages)]


def _build(db: Path, tmp: Path, **vars_) -> None:
    env = {**os.environ, "GENOPS_DUCKDB_PATH": str(db)}
    args = [dbt_executable(), "build", "--project-dir", str(DBT_PROJECT_DIR), "--profiles-dir", str(DBT_PROJECT_DIR),
            "--target-path", str(tmp / "target"), "--log-path", str(tmp / "logs"),
            "--vars", json.dumps({"task": "t", **vars_})]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


@pytest.fixture()
def wh(tmp_path) -> DuckDBWarehouse:
    return DuckDBWarehouse(path=str(tmp_path / "w.duckdb"))


def test_marts_dedup_hold_out_and_split(tmp_path, wh):
    base = _messages(300, seed=1)
    exact_dup = "  " + base[5].upper().replace(" ", "   ") + "\n"  # same text after normalising
    near_dup = base[7].replace("case", "kase")  # one word of 14 changed: Jaccard 13/15
    rows = [*_rows(base), ("incoming/a.jsonl", 1, exact_dup, "{}"), ("incoming/a.jsonl", 2, near_dup, "{}")]
    wh.replace_raw_examples("t", rows)
    wh.replace_raw_examples("other_task", _rows(_messages(5, seed=9)))
    _build(Path(wh.path), tmp_path)

    golden = wh.query_df("select * from marts_t.golden_eval_dataset")
    sft = wh.query_df("select * from marts_t.sft_dataset")
    shots = wh.query_df("select * from marts_t.few_shot_examples")
    assert len(golden) + len(sft) == 300, "exact and near duplicates (and other tasks) are dropped"
    assert 0.06 < len(golden) / 300 < 0.18
    assert set(sft["split"]) == {"train", "validation"}
    assert 0.03 < (sft["split"] == "validation").mean() < 0.15
    assert not set(golden["example_id"]) & set(sft["example_id"])
    assert "incoming/a.jsonl" not in set(golden["source_file"]) | set(sft["source_file"]), "first occurrence wins"

    for df in (golden, sft):
        for r in df.itertuples():
            digest = hashlib.sha256(normalise_text(r.input_text).encode()).hexdigest()
            assert r.content_hash == digest and r.example_id == "ex_" + digest[:16]
    gw = [word_set(normalise_text(t)) for t in golden["input_text"]]
    worst = max(jaccard(word_set(normalise_text(t)), g) for t in sft["input_text"] for g in gw)
    assert worst < 0.8

    assert set(shots["label"]) == set(CATS) and shots.groupby("label").size().max() == 2
    assert set(shots["example_id"]) <= set(sft[sft["split"] == "train"]["example_id"])

    # Adding data never moves an existing example between golden and training.
    wh.replace_raw_examples("t", rows + _rows(_messages(100, seed=2), "incoming/b.jsonl"))
    _build(Path(wh.path), tmp_path)
    golden2 = set(wh.query_df("select example_id from marts_t.golden_eval_dataset")["example_id"])
    assert set(golden["example_id"]) <= golden2
    assert not golden2 & set(wh.query_df("select example_id from marts_t.sft_dataset")["example_id"])


def test_split_fractions_come_from_vars(tmp_path, wh):
    wh.replace_raw_examples("t", _rows(_messages(200, seed=3)))
    _build(Path(wh.path), tmp_path, golden_fraction=0.5, validation_fraction=0.0, few_shot_per_label=1)
    n_golden = wh.query_df("select count(*) n from marts_t.golden_eval_dataset").iloc[0, 0]
    assert 70 < n_golden < 130
    assert wh.query_df("select count(*) n from marts_t.sft_dataset where split = 'validation'").iloc[0, 0] == 0
    per_label = "select max(c) m from (select count(*) c from marts_t.few_shot_examples group by label)"
    assert wh.query_df(per_label).iloc[0, 0] == 1


def test_project_is_not_a_python_package():
    assert not (DBT_PROJECT_DIR / "__init__.py").exists()


def test_contexts_reach_the_marts_and_leave_ids_and_splits_alone(tmp_path, wh):
    """Passages ride along (JSON lists, NULL where a task has none); identity, dedup and the
    split still come from the input alone."""
    messages = _messages(60, seed=4)
    plain = _rows(messages)
    wh.replace_raw_examples("t", plain)
    _build(Path(wh.path), tmp_path, golden_fraction=0.5)
    before = {m: wh.query_df(f"select * from marts_t.{m} order by example_id")
              for m in ("golden_eval_dataset", "sft_dataset")}
    for df in before.values():
        assert df["contexts_json"].isna().all() and df["reference_contexts_json"].isna().all()

    with_contexts = [(*r, json.dumps([f"passage A of {r[2][:20]}", "passage B"]),
                      json.dumps(["passage B"]) if i % 2 else None) for i, r in enumerate(plain)]
    # the same question again with other passages is a duplicate: the first occurrence wins
    with_contexts.append(("incoming/more.jsonl", 1, messages[0], plain[0][3], json.dumps(["other passage"]), None))
    wh.replace_raw_examples("t", with_contexts)
    _build(Path(wh.path), tmp_path, golden_fraction=0.5)
    by_input = {r[2]: r for r in with_contexts[:-1]}
    for mart, old in before.items():
        new = wh.query_df(f"select * from marts_t.{mart} order by example_id")
        cols = [c for c in old.columns if not c.endswith("contexts_json")]
        assert new[cols].equals(old[cols]), f"{mart}: ids, hashes, rows or split changed"
        for r in new.itertuples():
            src = by_input[r.input_text]
            assert json.loads(r.contexts_json) == json.loads(src[4])
            assert (src[5] is None and pd.isna(r.reference_contexts_json)) or json.loads(src[5]) == json.loads(
                r.reference_contexts_json)
    shots = wh.query_df("select * from marts_t.few_shot_examples")
    assert "contexts_json" not in shots.columns


def test_raw_rows_need_four_or_six_values(wh):
    with pytest.raises(ValueError, match="4 or 6 values"):
        wh.replace_raw_examples("t", [("examples.jsonl", 1, "text", "{}", "[]")])


def test_each_task_builds_into_its_own_schema(tmp_path, wh):
    """One dbt project, one DuckDB file: a task's build never replaces another task's marts."""
    wh.replace_raw_examples("t", _rows(_messages(60, seed=3)))
    wh.replace_raw_examples("other_task", _rows(_messages(40, seed=4)))
    _build(Path(wh.path), tmp_path)
    t_ids = set(wh.query_df("select example_id from marts_t.sft_dataset")["example_id"])
    _build(Path(wh.path), tmp_path, task="other_task")
    assert set(wh.query_df("select example_id from marts_t.sft_dataset")["example_id"]) == t_ids
    other = set(wh.query_df("select example_id from marts_other_task.sft_dataset")["example_id"])
    assert other and not other & t_ids
    from resources.warehouse import mart_schema

    assert wh.table_exists(mart_schema("other_task"), "golden_eval_dataset")
    assert not wh.table_exists("main", "sft_dataset")
