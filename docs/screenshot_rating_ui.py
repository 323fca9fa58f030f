"""Writes docs/ui_rating.png: the rating UI served for real on a temporary store of support_triage
items, driven by Playwright on the system Chromium (``.venv/bin/python docs/screenshot_rating_ui.py``)."""

from __future__ import annotations

import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from genops_assets.lib.ratings import RatingItem, RatingStore, store_path  # noqa: E402
from genops_assets.rating.app import create_app  # noqa: E402
from genops_assets.rating.service import RatingService  # noqa: E402

TASK = "support_triage"
FIELDS = ("category", "priority", "product", "summary")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def items() -> list[RatingItem]:
    """Champion vs challenger on golden prompts: the challenger misjudges the priority and writes a
    vaguer summary, as a weaker adapter does."""
    with open(REPO / "tasks" / TASK / "examples.jsonl", encoding="utf-8") as f:
        examples = [json.loads(line) for line in f if line.strip()][:5]
    vague = {"urgent": "medium", "high": "low", "medium": "low", "low": "medium"}
    out = []
    for n, ex in enumerate(examples):
        good = {k: ex[k] for k in FIELDS}
        weak = {**good, "priority": vague[ex["priority"]], "summary": "Customer contacted support about a product."}
        out.append(RatingItem(task=TASK, kind="pairwise", source="golden", example_id=f"ex-{n}",
                              input_text=ex["message"], response_1=json.dumps(good), model_1=f"{TASK}:v3",
                              response_2=json.dumps(weak), model_2=f"{TASK}:challenger", prompt_version="4",
                              priority=10.0 - n))
    return out


def main(target: Path = REPO / "docs" / "ui_rating.png") -> None:
    import uvicorn
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as home:
        store = RatingStore(store_path(home))
        token = store.add_rater("maria")
        store.put_items(TASK, items())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(RatingService(store, REPO / "tasks")), port=port,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.1)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS, headless=True)
                page = browser.new_page(viewport={"width": 1180, "height": 1020})
                page.goto(f"http://127.0.0.1:{port}/")
                page.get_by_label("Rater name").fill("maria")
                page.get_by_label("Token").fill(token)
                page.get_by_label("Token").press("Enter")
                page.get_by_role("button", name=TASK).click()
                keys = page.get_by_placeholder("Keys:", exact=False)
                keys.click()
                keys.press("a")
                keys.press("Enter")
                page.get_by_text("1 / 5 rated", exact=True).wait_for(timeout=20_000)
                page.get_by_role("radio", name="5").first.check()
                page.get_by_role("radio", name="2").nth(1).check()
                keys.click()
                keys.press("a")
                page.get_by_role("radio", name="the left answer (A) is better [A]").wait_for(timeout=20_000)
                page.wait_for_timeout(500)
                page.screenshot(path=str(target), full_page=True)
                browser.close()
        finally:
            server.should_exit = True
            thread.join(timeout=10)
    print(target)


if __name__ == "__main__":
    main()
