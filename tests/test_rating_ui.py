"""The rating UI for real: the server started as a process, the system Chromium driven by
Playwright; the rows are then read back from the rating store."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from genops_assets.lib.ratings import RatingItem, RatingStore, shown_first, store_path

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
TASK = "support_triage"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FIELDS = ("category", "priority", "product", "summary")

if not Path(CHROMIUM).is_file():
    pytest.skip(f"Chromium is not installed ({CHROMIUM} missing): `make test` installs the Debian package "
                "`chromium` before the tests", allow_module_level=True)


def examples() -> list[dict]:
    with open(REPO / "tasks" / TASK / "examples.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def answer(example: dict, **changes: str) -> str:
    return json.dumps({k: changes.get(k, example[k]) for k in FIELDS})


def queue_items() -> list[RatingItem]:
    """Two golden-prompt pairs (champion vs challenger), one live answer, one gold question."""
    ex = examples()
    pairs = [RatingItem(task=TASK, kind="pairwise", source="golden", example_id=f"ex-{n}", input_text=ex[n]["message"],
                        response_1=answer(ex[n]), model_1=f"{TASK}:v3",
                        response_2=answer(ex[n], priority="low", summary="Customer has a question."),
                        model_2=f"{TASK}:challenger", prompt_version="4", priority=10.0 - n) for n in (0, 1)]
    live = RatingItem(task=TASK, kind="single", source="live", request_id="req-1", input_text=ex[2]["message"],
                      response_1=answer(ex[2], product="none"), model_1=f"{TASK}:v3", prompt_version="4", priority=5.0)
    gold = RatingItem(task=TASK, kind="pairwise", source="gold", example_id="ex-3", input_text=ex[3]["message"],
                      response_1=answer(ex[3]), model_1="reference", response_2='{"category": "billing"',
                      model_2="corrupted:broken_json", gold_choice="1", prompt_version="4", priority=1.0)
    return [*pairs, live, gold]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m genops_assets.rating.cli`` on a free port, over a data directory."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        env = {**os.environ, "PYTHONPATH": str(REPO), "GENOPS_HOME": str(self.home)}
        self.proc = subprocess.Popen([sys.executable, "-m", "genops_assets.rating.cli", "--port", str(self.port),
                                      "--tasks-dir", str(REPO / "tasks")], env=env, cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the rating server exited: {self.proc.stdout.read()}")
            try:
                with urllib.request.urlopen(self.url + "/api/v1/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        raise AssertionError("the rating server did not answer /api/v1/health within 90 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def api(self, method: str, path: str, rater: str | None, token: str | None, body: dict | None = None):
        headers = {"Content-Type": "application/json"}
        if rater is not None:
            headers["X-Genops-Rater"] = rater
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


@pytest.fixture()
def setup(tmp_path):
    home = tmp_path / "home"
    store = RatingStore(store_path(home))
    tokens = {name: store.add_rater(name) for name in ("ana", "bo")}
    items = queue_items()
    store.put_items(TASK, items)
    server = Server(home).start()
    yield server, store, tokens, items
    server.stop()


@pytest.fixture()
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield b
        b.close()


def sign_in(page, url: str, rater: str, token: str) -> None:
    page.goto(url + "/")
    page.get_by_label("Rater name").fill(rater)
    page.get_by_label("Token").fill(token)
    page.get_by_label("Token").press("Enter")


def current_item(page) -> str:
    return page.get_by_text(re.compile(r"^Item it_")).inner_text().removeprefix("Item ").strip()


def saved(page, item_id: str) -> None:
    page.get_by_text(f"Saved your rating of {item_id}.").wait_for(timeout=20_000)


def test_rate_in_the_browser_and_find_the_rows(setup, browser):
    from playwright.sync_api import expect

    server, store, tokens, items = setup
    first, second, live, gold = items
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    sign_in(page, server.url, "ana", tokens["ana"])
    page.get_by_text("Pick a task").wait_for(timeout=20_000)
    page.get_by_role("button", name=re.compile(f"^{TASK}")).click()
    page.get_by_text("0 / 4 rated", exact=True).wait_for(timeout=20_000)

    # the first pair by keyboard: B, then Enter, in the key field; model names never shown
    assert current_item(page) == first.item_id
    body = page.locator("body").inner_text()
    assert f"{TASK}:v3" not in body and "challenger" not in body
    keys = page.get_by_placeholder(re.compile("^Keys:"))
    keys.click()
    keys.press("b")
    keys.press("Enter")
    saved(page, first.item_id)
    page.get_by_text("1 / 4 rated", exact=True).wait_for(timeout=20_000)

    # the second pair with the mouse: A is better, scores on both sides, B unsafe
    assert current_item(page) == second.item_id
    page.get_by_role("radio", name=re.compile(r"left answer \(A\) is better")).check()
    page.get_by_role("radio", name="4").first.check()
    page.get_by_role("radio", name="2").nth(1).check()
    page.get_by_role("checkbox", name="unsafe").nth(1).check()
    page.get_by_role("button", name="Submit rating").click()
    saved(page, second.item_id)

    # the live answer: a score and a correction, first one the schema refuses
    assert current_item(page) == live.item_id
    keys = page.get_by_placeholder(re.compile("^Keys:"))
    keys.click()
    keys.press("2")
    expect(page.get_by_role("radio", name="2")).to_be_checked()
    fixed = {**json.loads(live.response_1), "product": "doorbell"}
    correction = page.get_by_label(re.compile("^Corrected answer"))
    correction.fill(json.dumps({**fixed, "priority": "asap"}))
    page.get_by_role("button", name="Submit rating").click()
    page.get_by_text(re.compile(r"Not saved: corrected answer, field 'priority'")).wait_for(timeout=20_000)
    assert len(store.ratings(TASK)) == 2
    assert current_item(page) == live.item_id
    correction.fill(json.dumps(fixed))
    page.get_by_role("button", name="Submit rating").click()
    saved(page, live.item_id)
    page.get_by_text("3 / 4 rated", exact=True).wait_for(timeout=20_000)
    assert current_item(page) == gold.item_id

    rows = {r["item_id"]: r for r in store.ratings(TASK)}
    assert set(rows) == {first.item_id, second.item_id, live.item_id}
    assert {r["rater"] for r in rows.values()} == {"ana"}
    a_first, a_second = shown_first("ana", first.item_id), shown_first("ana", second.item_id)
    b_first = "2" if a_first == "1" else "1"
    r1, r2, r3 = rows[first.item_id], rows[second.item_id], rows[live.item_id]
    # choices in response numbers: B was the response not shown first
    assert (r1["choice"], r1["shown_first"]) == (b_first, a_first)
    assert (r2["choice"], r2["shown_first"]) == (a_second, a_second)
    scores = {a_second: 4, ("2" if a_second == "1" else "1"): 2}
    assert (r2["score_1"], r2["score_2"]) == (scores["1"], scores["2"])
    assert (r2["unsafe_1"], r2["unsafe_2"]) == ((1, 0) if a_second == "2" else (0, 1))
    assert (r3["choice"], r3["score_1"], json.loads(r3["correction_json"])) == (None, 2, fixed)
    for r in (r1, r2):
        assert (r["model_1"], r["model_2"], r["prompt_version"]) == (f"{TASK}:v3", f"{TASK}:challenger", "4")
    assert (r3["model_1"], r3["model_2"], r3["prompt_version"]) == (f"{TASK}:v3", None, "4")

    # a second submission of a rated item: 409, nothing stored twice
    status, body = server.api("POST", "/api/v1/ratings", "ana", tokens["ana"],
                              {"task": TASK, "item_id": first.item_id, "choice": "1"})
    assert status == 409 and "already rated" in body["detail"]
    assert len(store.ratings(TASK)) == 3

    # nothing lost on a restart: the same rows, the same place in the queue
    server.stop()
    server.start()
    status, body = server.api("GET", f"/api/v1/tasks/{TASK}/next", "ana", tokens["ana"])
    assert status == 200 and body["progress"] == {"done": 3, "total": 4}
    assert body["item"]["item_id"] == gold.item_id and "model_1" not in body["item"]
    assert len(store.ratings(TASK)) == 3


def test_bad_token_and_api_errors(setup, browser):
    server, store, tokens, items = setup
    first, _, live, _ = items
    page = browser.new_page()
    sign_in(page, server.url, "ana", tokens["ana"] + "x")
    page.get_by_text(re.compile("Sign-in refused: unknown rater or wrong token")).wait_for(timeout=20_000)
    assert page.get_by_label("Token").is_visible()

    for rater, token in (("ana", tokens["bo"]), ("nobody", tokens["ana"]), ("ana", None), (None, tokens["ana"])):
        status, body = server.api("GET", f"/api/v1/tasks/{TASK}/next", rater, token)
        assert status == 401, (rater, body)
    status, body = server.api("POST", "/api/v1/ratings", "ana", "wrong", {"task": TASK, "item_id": first.item_id,
                                                                          "choice": "1"})
    assert status == 401 and body["detail"] == "unknown rater or wrong token"

    post = {"task": TASK, "item_id": first.item_id, "choice": "2", "shown_first": "1", "score_1": 3}
    assert server.api("POST", "/api/v1/ratings", "bo", tokens["bo"], post)[0] == 201
    status, body = server.api("POST", "/api/v1/ratings", "bo", tokens["bo"], post)
    assert status == 409 and "has already rated item" in body["detail"]
    status, body = server.api("POST", "/api/v1/ratings", "bo", tokens["bo"],
                              {"task": TASK, "item_id": live.item_id, "score_1": 4,
                               "correction": {**json.loads(live.response_1), "category": "complaint"}})
    assert status == 422 and body["field"] == "category"
    status, body = server.api("POST", "/api/v1/ratings", "bo", tokens["bo"],
                              {"task": TASK, "item_id": "it_missing", "choice": "1"})
    assert status == 404 and "it_missing" in body["detail"]
    store.put_items(TASK, [live])  # the pairs leave the queue
    status, body = server.api("POST", "/api/v1/ratings", "ana", tokens["ana"],
                              {"task": TASK, "item_id": first.item_id, "choice": "1"})
    assert status == 410 and "left the queue" in body["detail"]
    assert [(r["rater"], r["item_id"], r["choice"]) for r in store.ratings(TASK)] == [("bo", first.item_id, "2")]
