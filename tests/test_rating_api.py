"""The rating API in-process (no UI mounted): authentication, blind items, status codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from genops_assets.lib.ratings import RatingItem, RatingStore
from genops_assets.rating.app import create_app
from genops_assets.rating.service import BlindItem, RatingService

REPO = Path(__file__).resolve().parents[1]
TASK = "support_triage"
ANSWER = {"category": "shipping", "priority": "medium", "product": "doorbell",
          "summary": "Customer asks where the doorbell order is; tracking has not moved."}


@pytest.fixture()
def api(tmp_path):
    store = RatingStore(tmp_path / "ratings.sqlite")
    token = store.add_rater("ana")
    item = RatingItem(task=TASK, kind="pairwise", source="live", request_id="req-9", input_text="where is my order",
                      response_1=json.dumps(ANSWER), model_1=f"{TASK}:v2",
                      response_2=json.dumps({**ANSWER, "priority": "low"}), model_2=f"{TASK}:v3", prompt_version="3")
    store.put_items(TASK, [item])
    client = TestClient(create_app(RatingService(store, REPO / "tasks"), with_ui=False))
    return client, store, {"X-Genops-Rater": "ana", "Authorization": f"Bearer {token}"}, item


def test_next_item_is_blind_and_rating_is_stored_once(api):
    client, store, auth, item = api
    r = client.get(f"/api/v1/tasks/{TASK}/next", headers=auth)
    assert r.status_code == 200
    got = r.json()
    assert got["progress"] == {"done": 0, "total": 1}
    assert "v2" not in json.dumps(got["item"]) and "v3" not in json.dumps(got["item"])
    blind = BlindItem.of(store.item(item.item_id), "ana")
    assert got["item"]["answer_a"] == getattr(item, f"response_{blind.shown_first}")
    rating = {"task": TASK, "item_id": item.item_id, "choice": blind.choice("B"), "shown_first": blind.shown_first,
              "score_1": 4, "correction": ANSWER}
    r = client.post("/api/v1/ratings", json=rating, headers=auth)
    assert r.status_code == 201 and r.json()["model_2"] == f"{TASK}:v3"
    r = client.post("/api/v1/ratings", json=rating, headers=auth)
    assert r.status_code == 409 and "already rated" in r.json()["detail"]
    [row] = store.ratings(TASK)
    assert row["choice"] == ("2" if blind.shown_first == "1" else "1") and row["prompt_version"] == "3"
    assert client.get(f"/api/v1/tasks/{TASK}/next", headers=auth).json()["item"] is None


def test_errors(api):
    client, store, auth, item = api
    assert client.get(f"/api/v1/tasks/{TASK}/next").status_code == 401
    wrong = {**auth, "Authorization": "Bearer nope"}
    r = client.get(f"/api/v1/tasks/{TASK}/next", headers=wrong)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.get("/api/v1/tasks/no_such_task/next", headers=auth).status_code == 404
    r = client.post("/api/v1/ratings", headers=auth,
                    json={"task": TASK, "item_id": item.item_id, "choice": "1", "correction": "{not json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]
    r = client.post("/api/v1/ratings", headers=auth, json={"task": TASK, "item_id": item.item_id, "choice": "left"})
    assert r.status_code == 422 and r.json()["field"] == "choice"
    store.disable_rater("ana")
    assert client.get(f"/api/v1/tasks/{TASK}/next", headers=auth).status_code == 401
    assert store.ratings(TASK) == []


def test_corrections_are_stored_with_their_pii_redacted(api):
    client, store, auth, item = api
    summary = "Customer asks for a refund; reach them at dana.k@example.org or 212-555-0142."
    r = client.post("/api/v1/ratings", headers=auth, json={
        "task": TASK, "item_id": item.item_id, "choice": "1", "correction": {**ANSWER, "summary": summary}})
    assert r.status_code == 201
    [row] = store.ratings(TASK)
    stored = json.loads(row["correction_json"])["summary"]
    assert "dana.k@example.org" not in row["correction_json"] and "555-0142" not in row["correction_json"]
    assert stored == "Customer asks for a refund; reach them at <EMAIL_ADDRESS> or <PHONE_NUMBER>."


def test_a_correction_valid_only_with_its_pii_is_refused_naming_the_field(api):
    client, store, auth, item = api
    # Within the schema's 200 characters with the address; redacted it is longer.
    summary = "Customer wants the doorbell order sent elsewhere. " * 3 + "x" * 31 + " Mail: a@b.io"
    assert len(summary) <= 200 < len(summary.replace("a@b.io", "<EMAIL_ADDRESS>"))
    r = client.post("/api/v1/ratings", headers=auth, json={
        "task": TASK, "item_id": item.item_id, "choice": "1", "correction": {**ANSWER, "summary": summary}})
    assert r.status_code == 422 and r.json()["field"] == "summary"
    assert "personal data (EMAIL_ADDRESS)" in r.json()["detail"] and "a@b.io" not in r.json()["detail"]
    assert store.ratings(TASK) == []
