"""Great Expectations validations of the marts, as blocking asset checks.

A failing check stops tuning in the same run; its metadata names the failing rows.
"""

from __future__ import annotations

import dagster as dg

from genops_assets.components.binding import task_key
from genops_assets.lib.tasks import TaskRef, TaskSpec
from resources.warehouse import DuckDBWarehouse, mart_schema

BASE_COLUMNS = ("example_id", "content_hash", "input_text", "output_json", "source_file", "source_row")
EXTRA_COLUMNS = {"sft_dataset": ("split", "origin"), "few_shot_examples": ("label",), "golden_eval_dataset": ()}
# The feedback marts' columns (dbt/models/feedback); the checks need every one to exist.
PREFERENCE_COLUMNS = ("pair_id", "item_id", "example_id", "request_id", "input_text", "prompt_version", "chosen_json",
                      "rejected_json", "chosen_model", "rejected_model", "n_ratings", "agreement", "source", "split")
CORRECTION_COLUMNS = ("correction_id", "item_id", "example_id", "request_id", "input_text", "output_json", "rater",
                      "rated_at", "source")
# Marts that carry the passages of a task with contexts: every row must have its retrieved ones.
CONTEXT_MARTS = ("golden_eval_dataset", "sft_dataset")


def mart_rules(spec: TaskSpec, mart: str, golden=None):
    """Expectations for one mart; training-side marts must not overlap the golden set."""
    from genops_assets.lib.validation import MartRules, normalise_text

    forbidden_hashes: frozenset[str] = frozenset()
    forbidden_texts: list[str] = []
    if golden is not None and mart != "golden_eval_dataset":
        forbidden_hashes = frozenset(golden["content_hash"].tolist())
        forbidden_texts = [normalise_text(t) for t in golden["input_text"].tolist()]
    columns = BASE_COLUMNS + EXTRA_COLUMNS[mart]
    if spec.contexts is not None and mart in CONTEXT_MARTS:
        columns += ("contexts_json",)
    return MartRules(
        required_columns=list(columns),
        non_null_columns=list(columns),
        unique_column="example_id",
        input_column="input_text",
        input_length=spec.input_length,
        output_schema=spec.output_schema,
        text_length={f: spec.text_length for f in spec.text_fields},
        forbidden_hashes=forbidden_hashes,
        forbidden_texts=forbidden_texts,
        near_duplicate_jaccard=spec.splits.near_duplicate_jaccard,
    )


def feedback_mart_rules(spec: TaskSpec, mart: str, golden=None):
    """Expectations of the feedback marts: a preference pair's answers differ and no ``train``
    pair's input is (nearly) a golden-set input; every correction is valid by the output schema."""
    from genops_assets.lib.validation import MartRules, normalise_text

    if mart == "preference_pairs":
        texts = [] if golden is None else [normalise_text(t) for t in golden["input_text"].tolist()]
        return MartRules(
            required_columns=list(PREFERENCE_COLUMNS),
            non_null_columns=["pair_id", "item_id", "input_text", "chosen_json", "rejected_json", "split"],
            unique_column="pair_id", input_column="input_text", input_length=None, output_schema=spec.output_schema,
            check_output_schema=False, json_column="chosen_json", distinct_columns=("chosen_json", "rejected_json"),
            forbidden_texts=texts, overlap_only_where=("split", "train"),
            near_duplicate_jaccard=spec.splits.near_duplicate_jaccard)
    if mart == "human_corrections":
        return MartRules(
            required_columns=list(CORRECTION_COLUMNS),
            non_null_columns=["correction_id", "item_id", "input_text", "output_json", "rater"],
            unique_column="correction_id", input_column="input_text", input_length=None,
            output_schema=spec.output_schema)
    raise ValueError(f"no feedback rules for mart '{mart}' (known: preference_pairs, human_corrections)")


def check_result(report) -> dg.AssetCheckResult:
    """A blocking check's result from a validation report: which expectations failed, on which rows."""
    failed = [o for o in report.outcomes if not o.success]
    metadata: dict[str, dg.RawMetadataValue] = {
        "rows": report.row_count,
        "expectations": len(report.outcomes),
        "failed_expectations": len(failed),
    }
    for o in failed:
        label = o.name + (f"[{o.column}]" if o.column else "")
        metadata[f"failed: {label}"] = dg.MetadataValue.json(
            {"failing_count": o.failing_count, "failing_rows": o.failing_rows, "details": o.details}
        )
    return dg.AssetCheckResult(
        passed=report.success,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata=metadata,
        description=report.summary(),
    )


def _make_feedback_check(task: TaskRef, mart: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=task_key(task, mart),
        name=f"gx_{mart}",
        blocking=True,
        description=("Great Expectations suite on preference_pairs: chosen != rejected, unique pair ids, no train "
                     "pair's input in the golden set (exact or near)") if mart == "preference_pairs" else
                    ("Great Expectations suite on human_corrections: every corrected answer valid by the task's "
                     "output schema, unique ids"),
    )
    def _check(warehouse: DuckDBWarehouse) -> dg.AssetCheckResult:
        from genops_assets.lib.validation import validate_mart

        spec = task.load()
        schema = mart_schema(spec.name)
        df = warehouse.query_df(f"select * from {schema}.{mart} order by 1")
        golden = warehouse.query_df(f"select input_text from {schema}.golden_eval_dataset")
        return check_result(validate_mart(mart, df, feedback_mart_rules(spec, mart, golden)))

    return _check


def _make_check(task: TaskRef, mart: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=task_key(task, mart),
        name=f"gx_{mart}",
        blocking=True,
        description=(
            f"Great Expectations suite on {mart}: columns, non-null, unique ids, length bounds, "
            "outputs valid by the task's output schema"
            + (", retrieved contexts on every row (tasks with contexts)" if mart in CONTEXT_MARTS else "")
            + ("" if mart == "golden_eval_dataset" else ", no overlap (exact or near) with the golden set")
        ),
    )
    def _check(warehouse: DuckDBWarehouse) -> dg.AssetCheckResult:
        from genops_assets.lib.validation import validate_mart

        spec = task.load()
        schema = mart_schema(spec.name)
        df = warehouse.query_df(f"select * from {schema}.{mart} order by example_id")
        golden = None
        if mart != "golden_eval_dataset":
            golden = warehouse.query_df(f"select content_hash, input_text from {schema}.golden_eval_dataset")
        return check_result(validate_mart(mart, df, mart_rules(spec, mart, golden)))

    return _check


def build_mart_checks(task: TaskRef) -> list[dg.AssetChecksDefinition]:
    """The blocking Great Expectations checks of one task's marts."""
    return [*(_make_check(task, m) for m in ("golden_eval_dataset", "sft_dataset", "few_shot_examples")),
            *(_make_feedback_check(task, m) for m in ("preference_pairs", "human_corrections"))]
