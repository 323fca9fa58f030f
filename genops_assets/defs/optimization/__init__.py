"""Optimization of a task's tuned model: variants (merged, quantized, distilled) as assets, the
table that judges them against the original, and the deploy of one variant.

``build_optimization_assets`` returns the whole family of a task. The assets that make variants
(each value ``{"variants": [VariantFiles dict + "version"]}``) come from their builders in
``variant_builders``; the report takes every one of them present as an input.
"""

from __future__ import annotations

from collections.abc import Callable

import dagster as dg

from genops_assets.components.binding import bind_task, task_group, task_ins, task_key
from genops_assets.lib.tasks import TaskRef

STAGE = "optimization"
# Assets whose value lists variants, by name, in the order their rows appear in the table.
VARIANT_ASSETS = ("merged_model", "quantized_models", "distilled_student")


def variant_builders() -> list[Callable[[TaskRef], list[dg.AssetsDefinition]]]:
    """The builders of the assets that make variants (one line each: import it, list it)."""
    from genops_assets.defs.optimization.distill import build_distill_assets
    from genops_assets.defs.optimization.variants import build_variant_assets

    return [build_variant_assets, build_distill_assets]


def build_optimization_assets(task: TaskRef) -> list[dg.AssetsDefinition]:
    """The variants' assets, ``optimization_report`` over those present, and ``deployed_variant``."""
    from genops_assets.defs.optimization.deploy import deployed_variant
    from genops_assets.defs.optimization.report import optimization_report

    group = task_group(task, STAGE)
    assets = [a for build in variant_builders() for a in build(task)]
    present = {k for a in assets for k in a.keys}
    variant_ins = {n: dg.AssetIn(key=task_key(task, n)) for n in VARIANT_ASSETS if task_key(task, n) in present}
    report = dg.asset(name="optimization_report", key_prefix=[task.name], group_name=group, kinds={"mlflow"},
                      ins={**task_ins(task, "tuned_adapter", "eval_report"), **variant_ins},
                      deps=[task_key(task, "golden_eval_dataset")])(bind_task(optimization_report, task))
    deploy = dg.asset(name="deployed_variant", key_prefix=[task.name], group_name=group, kinds={"openai"},
                      ins=task_ins(task, "optimization_report"))(bind_task(deployed_variant, task))
    return [*assets, report, deploy]
