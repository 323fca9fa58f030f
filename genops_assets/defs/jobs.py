"""Jobs of one task: the whole loop, the same loop as the target of continuous training, prompt
enhancement and preference tuning; each named after its task (``support_triage_genops_loop``)."""

from __future__ import annotations

import dagster as dg

from genops_assets.components.binding import task_group, task_key
from genops_assets.lib.tasks import TaskRef

# Stages with jobs of their own: daily monitoring, preference tuning (DPO), judge tuning and
# optimization (variants, their table and deploy).
OUTSIDE_LOOP = ("monitoring", "preference", "judge_tuning", "optimization")


def loop_selection(task: TaskRef) -> dg.AssetSelection:
    """The task's assets and the shared base model, except prompt enhancement (its own job: it asks
    a teacher model and scores candidates, which the loop does not need on every run),
    monitoring (partitioned by day, it follows the request log through declarative automation),
    and the stages people's ratings drive: preference tuning and judge tuning."""
    return ((dg.AssetSelection.key_prefixes([task.name]) | dg.AssetSelection.assets("base_model"))
            - dg.AssetSelection.assets(task_key(task, "prompt_candidates"))
            - dg.AssetSelection.groups(*(task_group(task, stage) for stage in OUTSIDE_LOOP)))


def preference_selection(task: TaskRef) -> dg.AssetSelection:
    """Preference tuning end to end: the ratings copied from the rating store and their agreement,
    the dbt models DPO reads (preference_pairs), the base model, DPO from the champion, its
    evaluation and gate, deployment."""
    tuned = dg.AssetSelection.assets(task_key(task, "preference_tuned_adapter"))
    marts = tuned.upstream(depth=1) & dg.AssetSelection.groups(task_group(task, "datasets"))
    ratings = marts.upstream(depth=1) & dg.AssetSelection.groups(task_group(task, "feedback"))
    return (ratings | marts | dg.AssetSelection.assets("base_model")
            | dg.AssetSelection.groups(task_group(task, "preference")))


def loop_job_name(task: str) -> str:
    return f"{task}_genops_loop"


def continuous_training_job_name(task: str) -> str:
    return f"{task}_continuous_training"


def prompt_enhancement_job_name(task: str) -> str:
    return f"{task}_prompt_enhancement"


def preference_tuning_job_name(task: str) -> str:
    return f"{task}_preference_tuning"


def judge_tuning_job_name(task: str) -> str:
    return f"{task}_judge_tuning"


def optimization_job_name(task: str) -> str:
    return f"{task}_optimization"


def build_task_jobs(task: TaskRef) -> list[dg.UnresolvedAssetJobDefinition]:
    tags = {"genops/task": task.name}
    return [
        dg.define_asset_job(
            loop_job_name(task.name), selection=loop_selection(task), tags=tags,
            description=f"Data -> checks -> tuning -> evaluation -> promotion -> serving of task {task.name}.",
        ),
        dg.define_asset_job(
            continuous_training_job_name(task.name), selection=loop_selection(task),
            description=f"Retrain, evaluate and promote task {task.name} when new data arrives (sensors) or "
                        "nightly (schedule).",
            tags={**tags, "genops/trigger": "continuous_training"},
        ),
        dg.define_asset_job(
            prompt_enhancement_job_name(task.name), selection=dg.AssetSelection.assets(
                task_key(task, "prompt_candidates")), tags=tags,
            description="An LLM rewrites the production prompt from the last evaluation's failures; candidates are "
                        "scored on the validation split and the best becomes `candidate` if it clears the gate.",
        ),
        dg.define_asset_job(
            judge_tuning_job_name(task.name), selection=dg.AssetSelection.groups(task_group(task, "judge_tuning")),
            tags=tags, description=f"Tune a LoRA judge for task {task.name} on people's choices and probe pairs, "
                                   "register it and certify it on held-out human labels; a passing certificate "
                                   "makes it the task's judge.",
        ),
        dg.define_asset_job(
            preference_tuning_job_name(task.name), selection=preference_selection(task),
            tags={**tags, "genops/trigger": "preference_pairs"},
            description=f"Rebuild task {task.name}'s preference pairs, tune the champion on them by DPO, evaluate, "
                        "gate and deploy like an SFT candidate.",
        ),
        dg.define_asset_job(
            optimization_job_name(task.name), selection=dg.AssetSelection.groups(task_group(task, "optimization")),
            tags=tags, description=f"Build task {task.name}'s optimized variants (merged, quantized, distilled), judge "
                                   "them against the candidate in one table and deploy the configured one.",
        ),
    ]
