"""What a continuous-training run must materialize: only what new data or new code changed.

Dagster records with each materialization the asset's code version and the data versions of the
inputs it read (its provenance); its stale-status resolver compares them with the current ones.
That covers every asset whose inputs are assets. The loop's roots read the outside world (the
task's files and reviewer labels, the base model's weights, the prompt files and registry
aliases, the rating store): for them the sensor computes the data version the asset would return
(the asset's own function) and compares it with the one last recorded. A changed root, a stale or
never-materialized asset runs, and so does everything downstream of it in the job; the rest is
skipped, not recomputed (an unchanged base model, prompt or rating store costs nothing).

An asset whose parent is not re-run and whose last blocking check on that parent failed stays out:
the gate already refused that version, and running the asset alone would step past it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg
from dagster._core.definitions.data_version import NULL_DATA_VERSION, CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContext
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from genops_assets.lib.tasks import TaskSpec, task_run_config
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking

# Longest value of the run tag that lists why assets run (Dagster limits tag values).
MAX_TAG_CHARS = 4000


class _InstanceLoading(LoadingContext):
    """The loader cache the stale-status resolver wants, over one instance, for one evaluation."""

    def __init__(self, instance: dg.DagsterInstance):
        self._instance = instance
        self._loaders: dict = {}

    @property
    def instance(self) -> dg.DagsterInstance:
        return self._instance

    @property
    def loaders(self) -> dict:
        return self._loaders


@dataclass(frozen=True)
class RunPlan:
    """The assets a run must materialize and why; ``held``: changed assets a failed gate keeps out."""

    selection: tuple[dg.AssetKey, ...]
    reasons: Mapping[str, str]
    held: Mapping[str, str]

    def summary(self) -> str:
        """The changed assets themselves (not those only downstream of one), for logs and a run tag."""
        own = {k: v for k, v in self.reasons.items() if not v.startswith("downstream of ")}
        text = "; ".join(f"{k}: {v}" for k, v in sorted(own.items()))
        return text if len(text) <= MAX_TAG_CHARS else text[:MAX_TAG_CHARS - 3] + "..."


def plan_run(instance: dg.DagsterInstance, asset_graph, job_keys: Collection[dg.AssetKey],
             root_versions: Mapping[dg.AssetKey, str]) -> RunPlan:
    """Which of ``job_keys`` must run: roots whose current data version (``root_versions``, as
    the asset would compute it now) differs from the one recorded, assets Dagster finds stale
    (new code version, an input with a new data version) or missing, and their downstream in the
    job, less what a failed blocking check on a parent that does not re-run holds back."""
    resolver = CachingStaleStatusResolver(instance, asset_graph, _InstanceLoading(instance))
    keys = set(job_keys)
    reasons: dict[dg.AssetKey, str] = {}
    for key in asset_graph.toposorted_asset_keys:
        if key not in keys:
            continue
        status = resolver.get_status(key)
        if status == StaleStatus.MISSING:
            reasons[key] = "never materialized"
            continue
        if key in root_versions:
            recorded = resolver.get_current_data_version(key)
            if recorded == NULL_DATA_VERSION or recorded.value != root_versions[key]:
                reasons[key] = f"new data version {root_versions[key]} (was {recorded.value})"
                continue
        if status == StaleStatus.STALE:
            reasons[key] = "; ".join(sorted({_cause(c) for c in resolver.get_stale_causes(key)}))
    _add_downstream(asset_graph, keys, reasons)
    held = _held_by_gates(instance, asset_graph, keys, reasons)
    for key in held:
        reasons.pop(key, None)
    # A step that cannot run part of its assets (a multi-asset that cannot subset) runs whole.
    for key in list(reasons):
        for other in asset_graph.get(key).execution_set_asset_keys - reasons.keys():
            reasons[other] = f"materialized in one step with {key.to_user_string()}"
    selection = tuple(k for k in asset_graph.toposorted_asset_keys if k in reasons)
    return RunPlan(selection, {k.to_user_string(): reasons[k] for k in selection},
                   {k.to_user_string(): v for k, v in held.items()})


def _cause(cause) -> str:
    if cause.dependency is not None:
        return f"{cause.reason} ({cause.dependency.asset_key.to_user_string()})"
    return cause.reason


def _add_downstream(asset_graph, keys: set[dg.AssetKey], reasons: dict[dg.AssetKey, str]) -> None:
    for key in asset_graph.toposorted_asset_keys:
        if key in reasons:
            for child in asset_graph.get(key).child_keys:
                if child in keys and child not in reasons:
                    reasons[child] = f"downstream of {key.to_user_string()}"


def _held_by_gates(instance: dg.DagsterInstance, asset_graph, keys: set[dg.AssetKey],
                   reasons: Mapping[dg.AssetKey, str]) -> dict[dg.AssetKey, str]:
    held: dict[dg.AssetKey, str] = {}
    for key in asset_graph.toposorted_asset_keys:
        if key not in reasons:
            continue
        for parent in sorted(asset_graph.get(key).parent_keys - reasons.keys()):
            if parent in held:
                held[key] = f"downstream of {parent.to_user_string()}, held"
                break
            refused = _failed_gate(instance, asset_graph, parent)
            if refused:
                held[key] = f"{refused} failed on {parent.to_user_string()}'s current version"
                break
    return held


def _failed_gate(instance: dg.DagsterInstance, asset_graph, key: dg.AssetKey) -> str | None:
    if key not in asset_graph.materializable_asset_keys:
        return None
    for check_key in sorted(asset_graph.get(key).check_keys, key=lambda c: c.name):
        if not asset_graph.get_check_spec(check_key).blocking:
            continue
        record = instance.get_latest_asset_check_evaluation_record(check_key)
        if record is not None and record.status == AssetCheckExecutionRecordStatus.FAILED:
            return check_key.name
    return None


def loop_root_versions(spec: TaskSpec, home: GenopsHome, mlflow: MlflowTracking,
                       run_config: Mapping[str, Any]) -> dict[dg.AssetKey, str]:
    """The data version each root of the task's loop would record if it ran now, computed by
    the assets' own functions (file digests, the rating store, the prompt registry's aliases)."""
    from genops_assets.components.binding import task_key
    from genops_assets.defs.datasets.assets import RAW_ASSET, raw_examples_version
    from genops_assets.defs.feedback.ratings import TABLE_ASSETS, current_ratings_version
    from genops_assets.defs.models.assets import base_model_version
    from genops_assets.defs.prompts.assets import current_prompt_templates_version

    model_path = (((run_config.get("ops") or {}).get("base_model") or {}).get("config") or {}).get("model_path")
    ratings = current_ratings_version(spec.name, home)
    return {
        dg.AssetKey("base_model"): base_model_version(model_path),
        task_key(spec.name, RAW_ASSET): raw_examples_version(spec, home),
        task_key(spec.name, "prompt_templates"): current_prompt_templates_version(spec, mlflow),
        **{task_key(spec.name, name): ratings for name in TABLE_ASSETS.values()},
    }


def step_config(run_config: Mapping[str, Any], asset_graph, selection: Collection[dg.AssetKey]) -> dict[str, Any]:
    """``run_config`` with the ``ops`` entries of steps the selection does not run left out (a run
    of a subset refuses config for steps it does not have)."""
    ops = run_config.get("ops")
    if not ops:
        return dict(run_config)
    steps = {asset_graph.get(k).assets_def.node_def.name for k in selection}
    return {**run_config, "ops": {k: v for k, v in ops.items() if k in steps}}


def continuous_training_request(context, spec: TaskSpec, home: GenopsHome, mlflow: MlflowTracking,
                                run_config: Mapping[str, Any], job_name: str, *, run_key: str | None,
                                tags: Mapping[str, str]) -> tuple[dg.RunRequest | None, RunPlan]:
    """A run of ``job_name`` over what changed (``plan_run``), or None when nothing did; the
    plan says why. ``context``: the sensor's or schedule's, with the code location's definitions."""
    repo = context.repository_def
    if repo is None:
        raise ValueError(f"{job_name}: the sensor needs the code location's definitions to tell what changed "
                         "(build_sensor_context(definitions=...))")
    job = repo.get_job(job_name)
    config = task_run_config(spec.name, dict(run_config))
    plan = plan_run(context.instance, repo.asset_graph, job.asset_layer.selected_asset_keys,
                    loop_root_versions(spec, home, mlflow, config))
    for key, why in plan.held.items():
        context.log.info(f"not run: {key}: {why}")
    if not plan.selection:
        return None, plan
    context.log.info(f"{len(plan.selection)} asset(s) to materialize; changed: {plan.summary()}")
    return dg.RunRequest(
        run_key=run_key,
        run_config=step_config(config, repo.asset_graph, plan.selection),
        asset_selection=list(plan.selection),
        tags={**tags, "genops/changed": plan.summary()},
    ), plan
