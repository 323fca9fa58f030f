"""What the rating UI and the rating API share: the store, the tasks, and the blind view of an item.

A rater sees a pairwise item's answers as A and B, never the model names; which response is A is
``ratings.shown_first`` of the rater and the item, so it differs between raters and items but not
between reloads. Everything the rater picks on screen is turned back into response numbers here,
before it reaches the store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from genops_assets.lib.ratings import Progress, RatingStore, UnknownItem, shown_first
from genops_assets.lib.tasks import TaskConfigError, TaskSpec, load_task

SCREEN_CHOICES = {"A": "the left answer (A) is better", "B": "the right answer (B) is better",
                  "tie": "tie: both equally good", "both_bad": "both bad"}


@dataclass(frozen=True)
class BlindItem:
    """An item as one rater sees it: answers by side, no model names, no gold marker."""

    item_id: str
    kind: str
    input_text: str
    answer_a: str
    answer_b: str | None
    shown_first: str | None

    @classmethod
    def of(cls, item: dict[str, Any], rater: str) -> BlindItem:
        if item["kind"] == "single":
            return cls(item["item_id"], "single", item["input_text"], item["response_1"], None, None)
        first = shown_first(rater, item["item_id"])
        second = "2" if first == "1" else "1"
        return cls(item["item_id"], "pairwise", item["input_text"], item[f"response_{first}"],
                   item[f"response_{second}"], first)

    def response_of(self, side: str) -> str:
        """The response number ("1" / "2") shown on ``side`` ("A" / "B")."""
        if self.shown_first is None:
            return "1"
        return self.shown_first if side == "A" else ("2" if self.shown_first == "1" else "1")

    def choice(self, screen_choice: str) -> str:
        """A screen choice (A, B, tie, both_bad) as the store's choice (response numbers)."""
        return self.response_of(screen_choice) if screen_choice in ("A", "B") else screen_choice

    def by_response(self, a: Any, b: Any) -> tuple[Any, Any]:
        """Per-side values (a score, an unsafe flag) as (response 1's, response 2's)."""
        return (a, b) if self.response_of("A") == "1" else (b, a)

    def as_dict(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "kind": self.kind, "input_text": self.input_text,
                "answer_a": self.answer_a, "answer_b": self.answer_b, "shown_first": self.shown_first}


def pretty(answer: str) -> str:
    """An answer's JSON indented for reading; text that is not JSON as it is."""
    try:
        return json.dumps(json.loads(answer), indent=2, ensure_ascii=False)
    except ValueError:
        return answer


class RatingService:
    """The rating store and the task folders, as the UI and the API use them."""

    def __init__(self, store: RatingStore, tasks_dir: str | Path) -> None:
        self.store = store
        self.tasks_dir = Path(tasks_dir)
        self.spec = cache(self._load)

    def _load(self, task: str) -> TaskSpec:
        try:
            return load_task(self.tasks_dir, task)
        except TaskConfigError as exc:
            raise UnknownItem(f"task '{task}' not found: {exc}") from exc

    def tasks(self) -> list[str]:
        return sorted(p.parent.name for p in self.tasks_dir.glob("*/task.yaml"))

    def next_item(self, task: str, rater: str) -> BlindItem | None:
        item = self.store.next_item(task, rater, self.spec(task).feedback)
        return BlindItem.of(item, rater) if item else None

    def blind(self, item_id: str, rater: str) -> BlindItem | None:
        item = self.store.item(item_id)
        return BlindItem.of(item, rater) if item else None

    def progress(self, task: str, rater: str) -> Progress:
        return self.store.progress(task, rater, self.spec(task).feedback)

    def submit(self, task: str, rater: str, item_id: str, **rating: Any) -> dict[str, Any]:
        return self.store.submit(task, item_id, rater, output_schema=self.spec(task).output_schema, **rating)
