"""The request log is shared by every task: one endpoint writes it, one job loads it."""

import dagster as dg

ingest_requests = dg.define_asset_job(
    "ingest_requests",
    selection=dg.AssetSelection.assets("request_log"),
    description="Load the endpoint's new request records into the feedback store.",
)
