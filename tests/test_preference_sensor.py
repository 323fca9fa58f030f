"""The preference-pairs sensor over cursor scenarios (build_sensor_context), on a real rating store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
from rating_rows import add_ratings

from genops_assets.lib.agreement import hash_bucket
from genops_assets.lib.ratings import RatingItem, RatingStore
from genops_assets.lib.tasks import TaskRef
from resources.paths import GenopsHome
from sensors import build_task_automation
from sensors.preference import build_preference_pairs_sensor

REPO = Path(__file__).resolve().parents[1]
NAME = "support_triage"


@pytest.fixture()
def task(tmp_path) -> TaskRef:
    dst = tmp_path / "tasks" / NAME
    shutil.copytree(REPO / "tasks" / NAME, dst, ignore=shutil.ignore_patterns("incoming"))
    with (dst / "task.yaml").open("a") as fh:
        fh.write("feedback:\n  min_new_pairs: 3\n  heldout_fraction: 0.2\n")
    return TaskRef(NAME, str(tmp_path / "tasks"))


@pytest.fixture()
def home(tmp_path) -> GenopsHome:
    return GenopsHome(root=str(tmp_path / "home"))


def train_items(n: int, start: int = 0) -> list[RatingItem]:
    """``n`` live pairwise items whose hash bucket puts them in the train split."""
    out, i = [], start
    while len(out) < n:
        item = RatingItem(NAME, "pairwise", "live", f"question {i}", '{"a": 1}', f"{NAME}:v2", '{"a": 2}', f"{NAME}:v1")
        if hash_bucket(item.item_id) >= 0.2:
            out.append(item)
        i += 1
    return out


def agree(store: RatingStore, items: list[RatingItem]) -> None:
    """Two raters choose answer 1 on each item: an agreed pair."""
    add_ratings(store, NAME, [(i.item_id, r, "1") for i in items for r in ("ana", "ben")])


def tick(task: TaskRef, home: GenopsHome, cursor: str | None = None):
    sensor = build_preference_pairs_sensor(task)
    return sensor(dg.build_sensor_context(cursor=cursor, resources={"home": home}))


def test_no_store_and_too_few_pairs_skip(task, home):
    res = tick(task, home)
    assert isinstance(res, dg.SkipReason) and "no rating store" in res.skip_message
    assert not home.ratings_path.exists(), "the sensor never creates the store"
    store = RatingStore(home.ratings_path)
    items = train_items(2)
    store.put_items(NAME, items)
    agree(store, items)
    res = tick(task, home)
    assert isinstance(res, dg.SkipReason) and "2 new agreed train pair(s) of 2, threshold 3" in res.skip_message


def test_enough_new_pairs_request_one_run_then_wait_for_more(task, home):
    store = RatingStore(home.ratings_path)
    first = train_items(3)
    disputed = RatingItem(NAME, "pairwise", "live", "disputed", '{"b": 1}', f"{NAME}:v2", '{"b": 2}', f"{NAME}:v1")
    store.put_items(NAME, [*first, disputed])
    agree(store, first)
    add_ratings(store, NAME, [(disputed.item_id, "ana", "1"), (disputed.item_id, "ben", "2")])  # no majority
    res = tick(task, home)
    assert isinstance(res, dg.SensorResult) and len(res.run_requests) == 1
    request = res.run_requests[0]
    assert request.run_key.startswith(f"preference_pairs:{NAME}:")
    assert request.tags["genops/train_pairs"] == "3" and request.tags["genops/new_train_pairs"] == "3"
    cursor = res.cursor
    assert len(json.loads(cursor)["consumed"]) == 3

    assert isinstance(tick(task, home, cursor), dg.SkipReason), "same pairs: no second run"

    more = train_items(2, start=1000)
    store.put_items(NAME, more, retire_others=False)
    agree(store, more)
    res = tick(task, home, cursor)
    assert isinstance(res, dg.SkipReason) and "2 new agreed train pair(s) of 5" in res.skip_message

    last = train_items(1, start=2000)
    store.put_items(NAME, last, retire_others=False)
    agree(store, last)
    res = tick(task, home, cursor)
    assert isinstance(res, dg.SensorResult)
    assert res.run_requests[0].run_key != request.run_key and res.run_requests[0].tags["genops/train_pairs"] == "6"

    # Another task's cursor covers nothing of this task's pairs.
    other = json.dumps({"task": "product_qa", "consumed": json.loads(cursor)["consumed"]})
    assert tick(task, home, other).run_requests[0].tags["genops/new_train_pairs"] == "6"
    with pytest.raises(ValueError, match="unreadable cursor"):
        tick(task, home, "not json")


def test_sensor_is_registered_when_the_preference_job_exists(task):
    names = [s.name for s in build_task_automation(task).sensors]
    assert f"{NAME}_preference_pairs_sensor" not in names
    defs = build_task_automation(task, [f"{NAME}_preference_tuning"])
    sensor = next(s for s in defs.sensors if s.name == f"{NAME}_preference_pairs_sensor")
    assert sensor.job_name == f"{NAME}_preference_tuning"
