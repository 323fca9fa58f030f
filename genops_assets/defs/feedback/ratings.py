"""People's ratings of one task: the queue they rate from, and their ratings in the warehouse.

``rating_queue`` writes the task's items into the rating store (SQLite, read by the rating UI);
``human_ratings`` copies items and ratings back into DuckDB with the agreement rules applied,
for the dbt marts (preference pairs, corrections, judgements, golden proposals).
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
from pydantic import Field

from genops_assets.components.binding import bind_task, task_group, task_ins, task_key
from genops_assets.lib.hashing import sha256_json
from genops_assets.lib.jsonl import iter_jsonl
from genops_assets.lib.tasks import TaskRef
from resources.feedback_store import FeedbackStore, RequestQuery
from resources.paths import GenopsHome
from resources.warehouse import FEEDBACK_SCHEMA, DuckDBWarehouse, mart_schema, monitoring_schema

# The warehouse tables human_ratings writes (schema ``feedback``), one row set per task.
ITEM_COLUMNS = (
    ("task", "varchar"), ("item_id", "varchar"), ("kind", "varchar"), ("source", "varchar"),
    ("example_id", "varchar"), ("request_id", "varchar"), ("input_text", "varchar"),
    ("prompt_version", "varchar"), ("response_1", "varchar"), ("model_1", "varchar"), ("response_2", "varchar"),
    ("model_2", "varchar"), ("reference_json", "varchar"), ("gold_choice", "varchar"), ("priority", "double"),
    ("reasons", "varchar"), ("created_at", "varchar"), ("retired", "boolean"),
)
RATING_COLUMNS = (
    ("task", "varchar"), ("rating_id", "varchar"), ("item_id", "varchar"), ("rater", "varchar"), ("ts", "varchar"),
    ("choice", "varchar"), ("shown_first", "varchar"), ("score_1", "integer"), ("score_2", "integer"),
    ("unsafe_1", "boolean"), ("unsafe_2", "boolean"), ("correction_json", "varchar"), ("model_1", "varchar"),
    ("model_2", "varchar"), ("prompt_version", "varchar"),
)
RATER_QUALITY_COLUMNS = (
    ("task", "varchar"), ("rater", "varchar"), ("ratings", "integer"), ("gold_answered", "integer"),
    ("gold_accuracy", "double"), ("kappa", "double"), ("excluded", "boolean"), ("reason", "varchar"),
)
ITEM_AGREEMENT_COLUMNS = (
    ("task", "varchar"), ("item_id", "varchar"), ("n_ratings", "integer"), ("majority_choice", "varchar"),
    ("agreement", "double"), ("included", "boolean"), ("reason", "varchar"),
)
BOOLEAN_COLUMNS = {"retired", "unsafe_1", "unsafe_2"}
# The asset (``<task>/<name>``) of each table: all four are written by the one ``human_ratings``
# step in one transaction; the ratings table carries the asset's name and its agreement report.
TABLE_ASSETS = {"ratings": "human_ratings", "rating_items": "rating_items", "rater_quality": "rater_quality",
                "item_agreement": "item_agreement"}


class RatingQueueConfig(dg.Config):
    max_live_requests: int = Field(2000, description="Most recent served requests of the task considered.")
    max_live_items: int = Field(200, description="Most live items in the queue (flagged first, then newest).")
    max_gold_examples: int = Field(200, description="Golden examples the gold questions are drawn from.")


def _table(warehouse: DuckDBWarehouse, schema: str, table: str) -> bool:
    return Path(warehouse.path).exists() and warehouse.table_exists(schema, table)


def queue_flags(warehouse: DuckDBWarehouse, task: str, sxs_rows_file: Path | None):
    """Flags from what the monitoring assets and AutoSxS stored; a source not there yet gives none."""
    from genops_assets.lib.rating_queue import DRIFT, JUDGE_DISAGREEMENT, ONLINE_QUALITY, Flags

    flags = Flags()
    schema = monitoring_schema(task)
    if _table(warehouse, schema, "flagged_prompts"):
        for r in warehouse.query_df(f"select request_id, input_text from {schema}.flagged_prompts").itertuples():
            flags.add(DRIFT, request_id=r.request_id, input_text=r.input_text)
    if _table(warehouse, schema, "online_quality") and _table(warehouse, schema, "online_quality_summary"):
        low = warehouse.query_df(
            f"""select distinct q.item_id from {schema}.online_quality q
                join {schema}.online_quality_summary s
                  on q.partition_key = s.partition_key and q.version = s.version and q.rubric = s.rubric
                where q.side = 'live' and q.score is not null and s.offline_mean is not null
                  and q.score < s.offline_mean""")
        for request_id in low["item_id"]:
            flags.add(ONLINE_QUALITY, request_id=request_id)
    if sxs_rows_file is not None and sxs_rows_file.is_file():
        for _, row in iter_jsonl(sxs_rows_file):
            if row.get("consistent") is False:
                flags.add(JUDGE_DISAGREEMENT, example_id=row.get("example_id"))
    return flags


def live_answers(feedback_store: FeedbackStore, task: str, limit: int):
    from genops_assets.lib.rating_queue import LiveAnswer

    df = feedback_store.requests(RequestQuery(
        ("request_id", "ts", "adapter_version", "prompt_version", "input_text", "response_text"), task=task,
        requests_only=True, status=200, not_null=("request_id", "input_text", "response_text"),
        order_by=("ts desc", "request_id"), limit=limit))
    return [LiveAnswer(str(r.request_id), r.ts, None if r.adapter_version is None else str(r.adapter_version),
                       r.prompt_version, r.input_text, r.response_text) for r in df.itertuples()]


def rating_queue(
    context: dg.AssetExecutionContext,
    config: RatingQueueConfig,
    eval_report: dict,
    sxs_evaluation: dict,
    task: TaskRef,
    warehouse: DuckDBWarehouse,
    feedback_store: FeedbackStore,
    home: GenopsHome,
) -> dg.Output[dict]:
    """The task's rating queue in the rating store (``<GENOPS_HOME>/feedback/ratings.sqlite``):
    candidate vs champion (or base) answers on golden prompts from eval_report's predictions,
    served requests of the task (two versions on one input: a pair; else one answer to score and
    correct), and gold questions (reference vs a corrupted copy). Prompts flagged by prompt drift,
    online quality or AutoSxS position inconsistency rank first. Items no longer produced are
    retired, their ratings kept. Cost: seconds, no model calls."""
    from genops_assets.lib.rating_queue import gold_count, gold_items, golden_items, live_items
    from genops_assets.lib.ratings import RatingStore

    spec = task.load()
    sxs_dir = Path(sxs_evaluation["report_html"]).parent if sxs_evaluation.get("report_html") else None
    flags = queue_flags(warehouse, spec.name, sxs_dir / "sxs_rows.jsonl" if sxs_dir else None)
    predictions = [row for _, row in iter_jsonl(eval_report["predictions_file"])]
    prompt_version = (eval_report.get("prompt") or {}).get("version")
    golden, skipped = golden_items(spec, predictions, None if prompt_version is None else str(prompt_version), flags)
    live, live_counts = live_items(spec, live_answers(feedback_store, spec.name, config.max_live_requests), flags,
                                   config.max_live_items)
    schema = mart_schema(spec.name)
    examples = warehouse.query_df(f"select example_id, input_text, output_json from {schema}.golden_eval_dataset "
                                  "order by example_id")
    gold = gold_items(spec, [(r.example_id, r.input_text, json.loads(r.output_json)) for r in examples.itertuples()],
                      gold_count(len(golden) + len(live), spec.feedback), config.max_gold_examples)
    items = [*golden, *live, *gold]
    store = RatingStore(home.ratings_path)
    changes = store.put_items(spec.name, items)
    by_reason: dict[str, int] = {}
    for i in items:
        for r in i.reasons:
            by_reason[r] = by_reason.get(r, 0) + 1
    counts = {"golden": len(golden), "live_pairwise": live_counts["pairwise"], "live_single": live_counts["single"],
              "gold": len(gold)}
    context.log.info(f"rating queue of {spec.name}: {len(items)} items {counts}, flagged {by_reason}, store "
                     f"{changes}; golden prompts left out {skipped}")
    value = {"store": str(home.ratings_path), "items": len(items), "by_source": counts, "by_reason": by_reason,
             "changes": changes, "digest": sha256_json(sorted(i.item_id for i in items))}
    return dg.Output(value, metadata={
        "items": len(items), "by_source": dg.MetadataValue.json(counts),
        "by_reason": dg.MetadataValue.json(by_reason), "flags_found": dg.MetadataValue.json(flags.counts()),
        "golden_left_out": dg.MetadataValue.json(skipped), "store_changes": dg.MetadataValue.json(changes),
        "store": dg.MetadataValue.path(str(home.ratings_path)),
    })


def _row(record: dict, columns) -> tuple:
    return tuple(bool(record[n]) if n in BOOLEAN_COLUMNS and record.get(n) is not None else record.get(n)
                 for n, _ in columns)


def copy_ratings(warehouse: DuckDBWarehouse, task: str, items: list[dict], ratings: list[dict], feedback):
    """The agreement rules on one task's store rows, and the four ``feedback`` tables replaced
    (the task's rows) in one transaction. Returns the report and the rows written per table."""
    from genops_assets.lib.agreement import agreement_report

    report = agreement_report(task, items, ratings, feedback)
    written = warehouse.replace_partitions(FEEDBACK_SCHEMA, "task", task, {
        "rating_items": (ITEM_COLUMNS, [_row(i, ITEM_COLUMNS) for i in items]),
        "ratings": (RATING_COLUMNS, [_row(r, RATING_COLUMNS) for r in ratings]),
        "rater_quality": (RATER_QUALITY_COLUMNS, [_row(vars(r), RATER_QUALITY_COLUMNS) for r in report.raters]),
        "item_agreement": (ITEM_AGREEMENT_COLUMNS, [_row(vars(i), ITEM_AGREEMENT_COLUMNS) for i in report.items]),
    })
    return report, written


# Bumped when human_ratings' logic changes: its tables are then stale and rebuilt.
RATINGS_CODE_VERSION = "ratings-1"
# Fields of an item the rating queue rewrites on every refresh: its place in the queue, not its content.
QUEUE_ORDER_FIELDS = ("priority", "reasons")


def ratings_version(items: list[dict], ratings: list[dict]) -> str:
    """Data version of the human_ratings tables: the ratings and the items they rate. Items nobody
    rated yet change no mart (each mart starts from ratings), so a refreshed queue alone (new
    items, new priorities) is no new data and starts no rebuild downstream."""
    rated = {r["item_id"] for r in ratings}
    kept = [{k: v for k, v in i.items() if k not in QUEUE_ORDER_FIELDS} for i in items if i["item_id"] in rated]
    return sha256_json([kept, ratings])[:16]


def current_ratings_version(task: str, home: GenopsHome) -> str:
    """``ratings_version`` of what the rating store holds now for ``task`` (read only)."""
    from genops_assets.lib.ratings import RatingStore

    store = RatingStore(home.ratings_path)
    return ratings_version(store.items(task), store.ratings(task))


def human_ratings(context: dg.AssetExecutionContext, task: TaskRef, warehouse: DuckDBWarehouse, home: GenopsHome):
    """The task's rating items and ratings copied from the rating store into the warehouse
    (``feedback.rating_items``, ``feedback.ratings``) with the agreement rules applied
    (``feedback.rater_quality``: gold accuracy, kappa, exclusions; ``feedback.item_agreement``:
    majority, agreement, inclusion), the task's rows of all four replaced in one transaction.
    Each table is an asset of this one step: ``human_ratings`` (feedback.ratings, with the
    agreement report), ``rating_items``, ``rater_quality``, ``item_agreement``. With no ratings
    the tables exist and hold none. Cost: seconds."""
    from genops_assets.lib.agreement import agreed_pairs
    from genops_assets.lib.ratings import RatingStore

    spec = task.load()
    store = RatingStore(home.ratings_path)
    items, ratings = store.items(spec.name), store.ratings(spec.name)
    version = dg.DataVersion(ratings_version(items, ratings))
    report, written = copy_ratings(warehouse, spec.name, items, ratings, spec.feedback)
    pairs = agreed_pairs(store, spec)
    train = sorted(p.pair_id for p in pairs if p.split == "train")
    summary = report.summary()
    context.log.info(f"human ratings of {spec.name}: {written}; kappa {summary['kappa']} ({summary['kappa_method']}), "
                     f"{summary['excluded_raters']} rater(s) and {summary['excluded_items']} item(s) excluded; "
                     f"{len(pairs)} agreed pair(s), {len(train)} for training")
    metadata = {
        "ratings": {
            "agreement_report": dg.MetadataValue.md(report.markdown()),
            "kappa": dg.MetadataValue.float(report.kappa) if report.kappa is not None else "not computed",
            "kappa_method": report.kappa_method,
            "rows": dg.MetadataValue.json(written),
            "excluded_raters": summary["excluded_raters"],
            "excluded_items": summary["excluded_items"],
            "excluded_item_reasons": dg.MetadataValue.json(summary["excluded_item_reasons"]),
            "agreed_pairs": len(pairs),
            "agreed_train_pairs": len(train),
            "train_pairs_digest": sha256_json(train),
            "store": dg.MetadataValue.path(str(home.ratings_path)),
        },
    }
    # All four tables are always written together; the step reports the assets the run selected
    # (a run of "eval_report and its upstream" needs only some of them).
    for table, name in TABLE_ASSETS.items():
        key = task_key(task, name)
        if key in context.selected_asset_keys:
            yield dg.MaterializeResult(asset_key=key, data_version=version, metadata={
                **metadata.get(table, {"rows": written[table]}), "table": f"{FEEDBACK_SCHEMA}.{table}"})


def build_rating_assets(task: TaskRef) -> list[dg.AssetsDefinition]:
    """The task's rating queue and its ratings in the warehouse (group ``<task>_feedback``)."""
    group = task_group(task, "feedback")
    return [
        dg.asset(key_prefix=[task.name], group_name=group, kinds={"sqlite"},
                 ins=task_ins(task, "eval_report", "sxs_evaluation"),
                 deps=[task_key(task, "golden_eval_dataset")])(bind_task(rating_queue, task)),
        dg.multi_asset(name=task.step("human_ratings"), can_subset=True, specs=[
            dg.AssetSpec(task_key(task, name), group_name=group, kinds={"duckdb"}, code_version=RATINGS_CODE_VERSION,
                         description=f"{FEEDBACK_SCHEMA}.{table}: the task's rows, copied from the rating store by "
                                     "the human_ratings step (agreement rules applied)")
            for table, name in TABLE_ASSETS.items()])(bind_task(human_ratings, task)),
    ]
