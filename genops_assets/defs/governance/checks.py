"""Blocking PII checks of the training and evaluation data.

The golden set, the SFT set, the few-shot pool and the preference pairs must hold no PII
(Presidio's pattern recognizers, the same the guardrails use). Each check is a Great Expectations
validation, like the marts' suites: Presidio's findings become a column that must be null. The
metadata names the table, the row id, the column and the entity type, never the value.
"""

from __future__ import annotations

import dagster as dg

from genops_assets.components.binding import task_key
from genops_assets.lib.tasks import TaskRef
from resources.warehouse import DuckDBWarehouse, mart_schema

# The mart's id column and the columns holding people's text (ids and hashes are not scanned).
PII_MARTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "golden_eval_dataset": ("example_id", ("input_text", "output_json", "contexts_json")),
    "sft_dataset": ("example_id", ("input_text", "output_json", "contexts_json")),
    "few_shot_examples": ("example_id", ("input_text", "output_json")),
    "preference_pairs": ("pair_id", ("input_text", "chosen_json", "rejected_json")),
}
MAX_LISTED = 50


def pii_check_result(mart: str, report, findings) -> dg.AssetCheckResult:
    listed = [{"table": mart, "row": str(f.row), "column": f.column, "entity": f.entity} for f in findings]
    entities: dict[str, int] = {}
    for f in findings:
        entities[f.entity] = entities.get(f.entity, 0) + 1
    rows = sorted({str(f.row) for f in findings})
    return dg.AssetCheckResult(
        passed=report.success,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"rows": report.row_count, "rows_with_pii": len(rows), "findings": len(findings),
                  "by_entity": dg.MetadataValue.json(entities),
                  "pii_findings": dg.MetadataValue.json(listed[:MAX_LISTED])},
        description=(f"{mart}: no PII in {report.row_count} rows" if report.success else
                     f"{mart}: PII in {len(rows)} row(s): " + "; ".join(
                         f"{d['row']} {d['column']} {d['entity']}" for d in listed[:10])),
    )


def _make_pii_check(task: TaskRef, mart: str) -> dg.AssetChecksDefinition:
    id_column, columns = PII_MARTS[mart]

    @dg.asset_check(asset=task_key(task, mart), name=f"no_pii_{mart}", blocking=True,
                    description=f"No PII (Presidio pattern recognizers) in {mart}'s {', '.join(columns)}")
    def _check(warehouse: DuckDBWarehouse) -> dg.AssetCheckResult:
        from genops_assets.lib.pii_scan import validate_no_pii

        df = warehouse.query_df(f"select * from {mart_schema(task.name)}.{mart} order by {id_column}")
        report, findings = validate_no_pii(mart, df, id_column=id_column, columns=columns)
        return pii_check_result(mart, report, findings)

    return _check


def build_pii_checks(task: TaskRef) -> list[dg.AssetChecksDefinition]:
    """The blocking PII checks of one task's data marts."""
    return [_make_pii_check(task, m) for m in PII_MARTS]
