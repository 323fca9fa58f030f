"""Preference tuning: DPO of the SFT champion on people's chosen / rejected answers, then the
same evaluation, gate and deployment as an SFT candidate."""


import dagster as dg

from genops_assets import __version__
from genops_assets.components.binding import bind_task, task_group, task_key
from genops_assets.defs.deployment.assets import deployed_endpoint
from genops_assets.defs.evaluation.assets import eval_report
from genops_assets.defs.evaluation.checks import promotion_gate_check
from genops_assets.defs.safety.assets import safety_asset
from genops_assets.defs.safety.checks import safety_gate_check
from genops_assets.defs.tuning.assets import (
    NOT_COMPUTED,
    TRAINING_LOCK,
    TRAINING_RETRY_POLICY,
    progress_logger,
    register_tuned,
    reuse_registered,
)
from genops_assets.defs.tuning.config import PreferenceTuningConfig
from genops_assets.lib.evaluation import examples_from_frame
from genops_assets.lib.integrity import files_digest, read_manifest
from genops_assets.lib.locks import exclusive
from genops_assets.lib.preference import (
    DPO_LOGGED_KEYS,
    HELDOUT,
    PREFERENCE_CODE_VERSION,
    PreferenceInputError,
    dpo_metrics,
    plan_preference,
    to_preference_pairs,
    train_dpo,
    win_rate_report,
)
from genops_assets.lib.report import loss_curve_png, png_markdown
from genops_assets.lib.tasks import TaskRef
from genops_assets.lib.tuning import ProgressLine
from genops_assets.serving.protocol import CHALLENGER, CHAMPION
from resources.paths import GenopsHome
from resources.tracking import VERSION_KEY_TAG, MlflowTracking, prompt_tags, registered_model_name
from resources.warehouse import DuckDBWarehouse, mart_schema

CODE_VERSION = f"genops-{__version__}/{PREFERENCE_CODE_VERSION}"
PAIRS_MART = "preference_pairs"
TUNING_TAG = "genops.tuning"
PARENT_VERSION_TAG = "genops.parent_version"
PAIR_LOG_COLUMNS = ["pair_id", "input_text", "chosen_json", "rejected_json"]


def interval_text(iv: dict) -> str:
    return f"{iv['estimate']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"


def example_contexts(warehouse: DuckDBWarehouse, schema: str) -> dict[str, tuple[str, ...]]:
    """The retrieved passages of every example of the task's marts, by example id."""
    out: dict[str, tuple[str, ...]] = {}
    for mart in ("sft_dataset", "golden_eval_dataset"):
        out.update({ex.example_id: ex.contexts
                    for ex in examples_from_frame(warehouse.query_df(f"select * from {schema}.{mart}"))})
    return out


def preference_tuned_adapter(
    context: dg.AssetExecutionContext,
    config: PreferenceTuningConfig,
    base_model: dict,
    task: TaskRef,
    warehouse: DuckDBWarehouse,
    mlflow: MlflowTracking,
    home: GenopsHome,
) -> dg.Output[dict]:
    """The SFT champion's LoRA adapter tuned by DPO on the `train` split of preference_pairs (the
    champion frozen as the reference), registered as a new version of the task's model with alias
    `challenger` and tags `genops.tuning=dpo` and its parent version. The held-out human-preference
    win rate (share of `heldout` pairs whose chosen answer the model finds more likely per token)
    is measured for the champion and the tuned adapter, with Wilson intervals. Same base model,
    champion, pairs, prompt and config -> same version key -> the registered version is reused.
    Cost: about a minute per 10 steps for the embedded model on 2 CPU cores."""
    spec = task.load()
    prompt_ref = mlflow.resolve_prompt(spec)
    model_name = registered_model_name(spec.name)
    champion = mlflow.alias(model_name, CHAMPION)
    if champion is None:
        raise dg.Failure(f"{model_name} has no `{CHAMPION}`: preference tuning starts from the SFT champion; run "
                         f"{spec.name}'s loop (tuning, evaluation, deployment) first", allow_retries=False)
    schema = mart_schema(spec.name)
    table = f"{schema}.{PAIRS_MART}"
    if not warehouse.table_exists(schema, PAIRS_MART):
        raise dg.Failure(f"{table} does not exist in {warehouse.path}: build the preference_pairs dbt model "
                         "(after human_ratings) first", allow_retries=False)
    champion_dir = mlflow.fetch_registered_adapter(home.registry_cache, model_name, champion.version)
    parent = {"version": champion.version, "adapter_digest": files_digest(read_manifest(champion_dir))}
    cfg = config.to_train_config()
    try:
        plan = plan_preference(warehouse.query_df(f"select * from {table} order by pair_id"),
                               base_model["folder_digest"], parent, prompt_ref.digest, cfg.as_params(), CODE_VERSION,
                               config.max_pairs, config.min_train_pairs, table)
        contexts = example_contexts(warehouse, schema) if spec.contexts is not None else None
        train = to_preference_pairs(spec, plan.train, prompt_ref.template, contexts)
        heldout = to_preference_pairs(spec, plan.heldout, prompt_ref.template, contexts)
    except PreferenceInputError as exc:
        raise dg.Failure(f"{table}: {exc}", allow_retries=False) from exc

    reused = reuse_registered(context, mlflow, model_name, plan.version_key)
    if reused is not None:
        return reused

    tags = {"genops.dagster_run_id": context.run.run_id, "genops.code_version": CODE_VERSION,
            TUNING_TAG: "dpo", PARENT_VERSION_TAG: champion.version, **prompt_tags(prompt_ref)}
    with mlflow.run(f"genops/{spec.name}", f"dpo-{plan.version_key[:8]}",
                    {**tags, "genops.task": spec.name, VERSION_KEY_TAG: plan.version_key}) as run_id:
        mlflow.link_prompt(run_id, prompt_ref)
        mlflow.log_params(run_id, {**cfg.as_params(), "base_model": base_model["name"], "parent_version":
                                   champion.version, "train_pairs": len(train), "heldout_pairs": len(heldout),
                                   "task": spec.name, "prompt_version": prompt_ref.version})
        for split, rows in (("train", plan.train), ("heldout", plan.heldout)):
            mlflow.log_dataset(run_id, rows[PAIR_LOG_COLUMNS].reset_index(drop=True),
                               name=f"{spec.name}-preference-{split}", source=f"{warehouse.path}#{table}",
                               digest=plan.digests[split], context="training" if split == "train" else "evaluation")

        on_progress = progress_logger(context, mlflow, run_id, dpo_metrics,
                                      ProgressLine(keys=DPO_LOGGED_KEYS, label="preference tuning"))
        adapter_dir = home.models_dir / "adapters" / plan.version_key
        try:
            with exclusive(home.runs_dir / TRAINING_LOCK, on_wait=context.log.warning):
                result = train_dpo(base_model["path"], champion_dir, train, cfg, adapter_dir,
                                   home.runs_dir / plan.version_key, on_progress=on_progress,
                                   on_message=context.log.warning)
        except PreferenceInputError as exc:
            raise dg.Failure(str(exc), allow_retries=False) from exc
        curve = home.runs_dir / plan.version_key / "loss_curve.png"
        curve.write_bytes(loss_curve_png(result.history, title="DPO loss"))
        mlflow.log_artifact(run_id, curve, "plots")

        win_rates = None
        if heldout:
            win_rates = win_rate_report(base_model["path"], champion_dir, adapter_dir, heldout,
                                        config.score_batch_size, cfg.seed)
            mlflow.log_metrics(run_id, {f"heldout_win_rate_{when}{part}": win_rates[when][key]
                                        for when in ("before", "after")
                                        for part, key in (("", "estimate"), ("_low", "low"), ("_high", "high"))})
            mlflow.log_metrics(run_id, {"heldout_share_moved": win_rates["shift"]["share_moved"]["estimate"],
                                        "heldout_mean_margin_change":
                                            win_rates["shift"]["mean_margin_change"]["estimate"]})
            context.log.info(f"held-out preference win rate on {len(heldout)} pairs: champion v{champion.version} "
                             f"{interval_text(win_rates['before'])}, tuned {interval_text(win_rates['after'])}, "
                             f"change {interval_text(win_rates['change'])}; pairs moved towards the chosen answer "
                             f"{interval_text(win_rates['shift']['share_moved'])}")
        else:
            context.log.warning(f"{table} has no '{HELDOUT}' pairs: held-out win rate not computed")

        digests = {"genops.parent_adapter_digest": parent["adapter_digest"],
                   "genops.preference_train_digest": plan.digests["train"],
                   "genops.preference_heldout_digest": plan.digests["heldout"]}
        extra = {"tuning": "dpo", "parent_version": champion.version, "train_pairs": result.train_pairs,
                 "heldout_win_rate": win_rates}
        adapter, model, mv = register_tuned(
            mlflow, run_id, model_name, plan.version_key, adapter_dir, prompt_ref, base_model, {**tags, **digests},
            plan.digests, result.steps, (result.last("loss"), None),
            f"DPO (beta={cfg.beta}) of v{champion.version} on {result.train_pairs} preference pairs, "
            f"{result.steps} steps", extra)
    context.log.info(f"registered {model_name} v{mv.version} (alias {CHALLENGER}), DPO of v{champion.version}, "
                     f"{result.steps} steps in {result.runtime_s:.0f}s")

    def rate(when: str, key: str = "estimate"):
        return NOT_COMPUTED if win_rates is None else float(win_rates[when][key])

    return dg.Output({**adapter.as_dict(), **extra, "version": mv.version}, metadata={
        "model": model_name,
        "version": mv.version,
        "version_key": plan.version_key,
        "parent_version": champion.version,
        "prompt_version": prompt_ref.version,
        "mlflow_run_id": run_id,
        "mlflow_model_id": model.model_id,
        "model_uri": f"models:/{model_name}/{mv.version}",
        "steps": result.steps,
        "train_pairs": result.train_pairs,
        "heldout_pairs": len(heldout),
        "skipped_too_long": len(result.skipped_too_long),
        "final_train_loss": NOT_COMPUTED if adapter.final_train_loss is None else adapter.final_train_loss,
        "final_reward_accuracy": NOT_COMPUTED if result.last("reward_accuracy") is None
        else result.last("reward_accuracy"),
        "heldout_win_rate_before": rate("before"),
        "heldout_win_rate_after": rate("after"),
        "heldout_share_moved": NOT_COMPUTED if win_rates is None
        else float(win_rates["shift"]["share_moved"]["estimate"]),
        "heldout_win_rate": dg.MetadataValue.json(win_rates) if win_rates else NOT_COMPUTED,
        "runtime_s": round(result.runtime_s, 1),
        "adapter_dir": dg.MetadataValue.path(str(adapter_dir)),
        "adapter_sha256": adapter.adapter_digest,
        "loss_curve": dg.MetadataValue.md(png_markdown("loss", curve.read_bytes())),
    })


def build_preference_assets(task: TaskRef) -> list[dg.AssetsDefinition]:
    """DPO from the champion, then eval_report, safety_report and deployed_endpoint bound a second
    time with the preference-tuned adapter as their candidate."""
    group = task_group(task, "preference")
    adapter_in = dg.AssetIn(key=task_key(task, "preference_tuned_adapter"))
    return [
        dg.asset(key_prefix=[task.name], group_name=group, deps=[task_key(task, PAIRS_MART)],
                 kinds={"pytorch", "mlflow"}, code_version=CODE_VERSION, pool="training",
                 retry_policy=TRAINING_RETRY_POLICY)(bind_task(preference_tuned_adapter, task)),
        dg.asset(name="preference_eval_report", key_prefix=[task.name], group_name=group, kinds={"mlflow"},
                 ins={"tuned_adapter": adapter_in},
                 deps=[task_key(task, name) for name in ("golden_eval_dataset", "few_shot_examples",
                                                         "prompt_templates")],
                 description="eval_report of the preference-tuned adapter: golden-set scores against the "
                             "champion it was tuned from, with the promotion decision.")(bind_task(eval_report, task)),
        safety_asset(task, "preference_safety_report", group, "preference_tuned_adapter", "preference_eval_report",
                     "safety_report of the preference-tuned adapter: the red-team suite behind the task's "
                     "guardrails, against the champion it was tuned from, with the safety gate."),
        dg.asset(name="preference_deployed_endpoint", key_prefix=[task.name], group_name=group, kinds={"openai"},
                 ins={"eval_report": dg.AssetIn(key=task_key(task, "preference_eval_report")),
                      "safety_report": dg.AssetIn(key=task_key(task, "preference_safety_report")),
                      "tuned_adapter": adapter_in},
                 description="deployed_endpoint of the preference-tuned adapter: served as `challenger`, checked "
                             "for serving parity, then promoted to `champion`.")(bind_task(deployed_endpoint, task)),
    ]


def build_preference_checks(task: TaskRef) -> list[dg.AssetChecksDefinition]:
    """The promotion and safety gates on the preference-tuned adapter's reports."""
    return [promotion_gate_check(task, "preference_eval_report"),
            safety_gate_check(task, "preference_safety_report")]
