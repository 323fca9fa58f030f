"""The feedback store: every request the endpoint served, in a table of the feedback store."""

import dagster as dg

from genops_assets.lib.feedback import COLUMNS, load_redactor, read_new_records
from resources.feedback_store import FeedbackStore
from resources.paths import GenopsHome


@dg.asset(group_name="feedback", kinds={"duckdb", "bigquery"})
def request_log(context: dg.AssetExecutionContext, feedback_store: FeedbackStore, home: GenopsHome) -> dg.Output[dict]:
    """New lines of the endpoint's request log (request id, timestamps, model and adapter
    version, prompt version, latency, tokens, status) appended to the feedback store's requests
    table (`feedback.requests` in DuckDB, or BigQuery in the cloud profile), each exactly once.
    Records pass the store's redaction hook (`GENOPS_REDACTOR=module:function`) before they are stored.
    Cost: seconds."""
    path = home.endpoint_dir / "requests.jsonl"
    source = str(path)
    offset = feedback_store.offset(source)
    chunk = read_new_records(path, offset, load_redactor(feedback_store.redactor))
    for problem in chunk.malformed:
        context.log.warning(f"skipped malformed request record: {problem}")
    loaded = feedback_store.append(source, chunk, COLUMNS)
    total = feedback_store.count()
    table = feedback_store.table_ref
    context.log.info(f"{loaded} new request records from {path} (bytes {chunk.start}-{chunk.end}"
                     f"{', file was rotated' if chunk.rotated else ''}); {total} in {table}")
    return dg.Output({"loaded": loaded, "total": total, "offset": chunk.end, "malformed": len(chunk.malformed)},
                     metadata={"loaded": loaded, "total_rows": total, "malformed_lines": len(chunk.malformed),
                               "table": table, "source": dg.MetadataValue.path(source)})
