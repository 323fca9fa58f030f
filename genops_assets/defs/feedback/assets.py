"""The feedback store: every request the endpoint served, in a warehouse table."""

import os

import dagster as dg

from genops_assets.lib.feedback import COLUMNS, load_redactor, read_new_records
from resources.paths import GenopsHome
from resources.warehouse import FEEDBACK_SCHEMA, DuckDBWarehouse


@dg.asset(group_name="feedback", kinds={"duckdb"})
def request_log(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse, home: GenopsHome) -> dg.Output[dict]:
    """New lines of the endpoint's request log (request id, timestamps, model and adapter
    version, prompt version, latency, tokens, status) appended to `feedback.requests`, each
    exactly once. Records pass the redaction hook (`GENOPS_REDACTOR=module:function`) before
    they are stored. Cost: seconds."""
    path = home.endpoint_dir / "requests.jsonl"
    source = str(path)
    offset = warehouse.feedback_offset(source)
    chunk = read_new_records(path, offset, load_redactor(os.environ.get("GENOPS_REDACTOR")))
    for problem in chunk.malformed:
        context.log.warning(f"skipped malformed request record: {problem}")
    loaded = warehouse.append_feedback(source, chunk, COLUMNS)
    total = 0
    if warehouse.table_exists(FEEDBACK_SCHEMA, "requests"):
        total = int(warehouse.query_df(f"select count(*) from {FEEDBACK_SCHEMA}.requests").iloc[0, 0])
    context.log.info(f"{loaded} new request records from {path} (bytes {chunk.start}-{chunk.end}"
                     f"{', file was rotated' if chunk.rotated else ''}); {total} in {FEEDBACK_SCHEMA}.requests")
    return dg.Output({"loaded": loaded, "total": total, "offset": chunk.end, "malformed": len(chunk.malformed)},
                     metadata={"loaded": loaded, "total_rows": total, "malformed_lines": len(chunk.malformed),
                               "table": f"{FEEDBACK_SCHEMA}.requests", "source": dg.MetadataValue.path(source)})
