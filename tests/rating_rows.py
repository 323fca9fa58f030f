"""Raters and ratings written into a rating store as the rating UI stores them (tests only)."""

from __future__ import annotations

from genops_assets.lib.ratings import RatingStore


def add_ratings(store: RatingStore, task: str, rows: list[tuple]) -> None:
    """``rows``: (item_id, rater, choice[, correction_json]); times follow the list order."""
    with store.connect() as db:
        for rater in sorted({r[1] for r in rows}):
            db.execute("insert or ignore into raters (name, token_sha256, created_at) values (?, ?, ?)",
                       (rater, "0" * 64, "2026-01-01T00:00:00+00:00"))
        start = db.execute("select count(*) from ratings").fetchone()[0]
        for n, (item_id, rater, choice, *rest) in enumerate(rows, start=start):
            db.execute("insert into ratings (rating_id, task, item_id, rater, ts, choice, correction_json) "
                       "values (?, ?, ?, ?, ?, ?, ?)",
                       (f"r{n}", task, item_id, rater, f"2026-01-01T00:{n // 60:02d}:{n % 60:02d}", choice,
                        rest[0] if rest else None))
