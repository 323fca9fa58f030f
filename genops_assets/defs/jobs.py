"""Jobs: the whole loop, and the same loop as the continuous-training target of sensors."""

from __future__ import annotations

import dagster as dg

# Prompt enhancement is its own job: it asks a teacher model and scores candidates, which the
# loop does not need on every run.
# Monitoring is partitioned by day and follows the request log through declarative automation.
LOOP_SELECTION = (dg.AssetSelection.all() - dg.AssetSelection.assets("prompt_candidates", "request_log")
                  - dg.AssetSelection.groups("monitoring"))

genops_loop = dg.define_asset_job(
    "genops_loop",
    selection=LOOP_SELECTION,
    description="Data -> checks -> tuning -> evaluation -> promotion -> serving, on the active task.",
)

continuous_training = dg.define_asset_job(
    "continuous_training",
    selection=LOOP_SELECTION,
    description="Retrain, evaluate and promote when new data arrives (sensor) or nightly (schedule).",
    tags={"genops/trigger": "continuous_training"},
)

prompt_enhancement = dg.define_asset_job(
    "prompt_enhancement",
    selection=dg.AssetSelection.assets("prompt_candidates"),
    description="An LLM rewrites the production prompt from the last evaluation's failures; candidates are "
                "scored on the validation split and the best becomes `candidate` if it clears the gate.",
)

ingest_requests = dg.define_asset_job(
    "ingest_requests",
    selection=dg.AssetSelection.assets("request_log"),
    description="Load the endpoint's new request records into the feedback store.",
)
