"""Jobs: the whole loop, and the same loop as the continuous-training target of sensors."""

from __future__ import annotations

import dagster as dg

LOOP_SELECTION = dg.AssetSelection.all()

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
