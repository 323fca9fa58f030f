"""The genops Dagster code location. Thin: it merges asset families, resources and sensors.

Loading it imports no ML library (torch, transformers, peft, trl, deepspeed, great_expectations);
those are imported inside the assets that use them.
"""

import dagster as dg

import resources
import sensors
from genops_assets.defs.datasets.assets import dbt_marts, raw_task_examples
from genops_assets.defs.datasets.checks import mart_checks
from genops_assets.defs.deployment.assets import deployed_endpoint
from genops_assets.defs.evaluation.assets import eval_report
from genops_assets.defs.evaluation.checks import beats_champion
from genops_assets.defs.evaluation.sxs import sxs_evaluation
from genops_assets.defs.feedback.assets import request_log
from genops_assets.defs.jobs import continuous_training, genops_loop, ingest_requests, prompt_enhancement
from genops_assets.defs.models.assets import base_model
from genops_assets.defs.monitoring.drift import drift_calibration, prompt_drift
from genops_assets.defs.monitoring.quality import online_quality
from genops_assets.defs.monitoring.serving import resource_usage, serving_metrics
from genops_assets.defs.prompts.assets import prompt_candidates, prompt_templates
from genops_assets.defs.tuning.assets import tuned_adapter


def asset_definitions() -> dg.Definitions:
    """Assets, checks and jobs without resources (tests bind their own)."""
    return dg.Definitions(
        assets=[raw_task_examples, dbt_marts, base_model, prompt_templates, tuned_adapter, eval_report,
                prompt_candidates, sxs_evaluation, deployed_endpoint, request_log,
                serving_metrics, resource_usage, drift_calibration, prompt_drift, online_quality],
        asset_checks=[*mart_checks, beats_champion],
        jobs=[genops_loop, continuous_training, prompt_enhancement, ingest_requests],
        # One machine, one DuckDB file, one model in memory at a time: steps run in one process.
        executor=dg.in_process_executor,
    )


defs = dg.Definitions.merge(asset_definitions(), resources.defs(), sensors.defs())
