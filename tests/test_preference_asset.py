"""preference_tuned_adapter in-process on the tiny Llama, from a registered champion through
registration, its evaluation and gate; reuse by version key; clear failures on bad input."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import duckdb
import pytest
from graph_support import register_version
from test_preference import champion_pairs

from genops_assets.defs.tuning.preference import build_preference_assets, build_preference_checks
from genops_assets.lib.hashing import sha256_dir
from genops_assets.lib.prompts import PRODUCTION, prompt_registry_name
from genops_assets.lib.tasks import TaskRef, load_task
from resources.judge import JudgeResource
from resources.paths import GenopsHome
from resources.storage import LocalStorage
from resources.tracking import CHALLENGER, CHAMPION, MlflowTracking, registered_model_name
from resources.warehouse import DuckDBWarehouse, mart_schema

pytestmark = pytest.mark.graph

ROOT = Path(__file__).resolve().parents[1]
TASK = "support_triage"
MODEL = registered_model_name(TASK)
SCHEMA = mart_schema(TASK)
TASK_REF = TaskRef(TASK, str(ROOT / "tasks"))
STEP = TASK_REF.step("preference_tuned_adapter")
# The contract columns of the preference_pairs mart.
PAIR_COLUMNS = ("pair_id", "item_id", "example_id", "request_id", "input_text", "prompt_version", "chosen_json",
                "rejected_json", "chosen_model", "rejected_model", "n_ratings", "agreement", "source", "split")
TINY = {"learning_rate": 5e-3, "max_steps": 6, "batch_size": 4, "warmup_steps": 0, "min_train_pairs": 4}


def write_pairs(warehouse: DuckDBWarehouse, df) -> None:
    rows = df.assign(request_id=None, prompt_version=1, chosen_model="reference",
                     rejected_model=f"{TASK}:champion", n_ratings=3, agreement=1.0, source="golden")
    con = duckdb.connect(warehouse.path)
    con.execute(f"create schema if not exists {SCHEMA}")
    con.execute(f"drop table if exists {SCHEMA}.preference_pairs")
    con.register("pairs", rows[list(PAIR_COLUMNS)])
    con.execute(f"create table {SCHEMA}.preference_pairs as select * from pairs")
    con.close()


@pytest.fixture()
def res(tmp_path, tiny_model_dir, tiny_adapter_dir):
    home = tmp_path / "home"
    home.mkdir()
    warehouse = DuckDBWarehouse(path=str(home / "warehouse.duckdb"))
    spec = load_task(ROOT / "tasks", TASK)
    df = champion_pairs(spec, tiny_model_dir, tiny_adapter_dir)
    write_pairs(warehouse, df)
    con = duckdb.connect(warehouse.path)  # the golden set the evaluation reads: the held-out pairs' examples
    con.execute(f"create table {SCHEMA}.golden_eval_dataset as select example_id, input_text, chosen_json as "
                f"output_json from {SCHEMA}.preference_pairs where split = 'heldout'")
    con.close()
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                              artifact_root=(tmp_path / "artifacts").as_uri())
    ref, _ = tracking.register_prompt(prompt_registry_name(TASK), spec.prompt, "the task folder's prompt")
    tracking.set_prompt_alias(ref.name, PRODUCTION, ref.version)
    return {"warehouse": warehouse, "home": GenopsHome(root=str(home)), "mlflow": tracking,
            "storage": LocalStorage(root=str(home / "objects")),
            "judge": JudgeResource(base_url="http://127.0.0.1:9/v1", model="judge", max_retries=0),
            "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io")), "df": df}


def materialize(res: dict, tiny_model_dir: Path, with_eval: bool = False, **config):
    base = {"name": "tiny", "path": str(tiny_model_dir), "folder_digest": sha256_dir(tiny_model_dir)}

    @dg.asset(name="base_model")
    def base_model_value() -> dict:
        return base

    tuned, report, _safety, _deployed = build_preference_assets(TASK_REF)
    gate = [c for c in build_preference_checks(TASK_REF) if {k.asset_key for k in c.check_keys} == {report.key}]
    assets = [base_model_value, tuned, *([report, *gate] if with_eval else [])]
    ops = {STEP: {"config": {**TINY, **config}}}
    if with_eval:
        ops[TASK_REF.step("preference_eval_report")] = {"config": {"max_examples": 3, "batch_size": 3,
                                                                   "base_few_shot": 0, "margin": -1.0}}
    resources = {k: v for k, v in res.items() if k != "df"}
    return dg.materialize(assets, resources=resources, run_config={"ops": ops}, raise_on_error=False)


def failure(result) -> str:
    (event,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    return event.event_specific_data.error.message


def champion(res, tiny_model_dir, tiny_adapter_dir) -> str:
    tracking = res["mlflow"]
    version = register_version(tracking, tracking.resolve_prompt(TASK_REF.load()), tiny_adapter_dir, tiny_model_dir)
    tracking.promote(MODEL, version, {})
    return version


def test_dpo_from_the_champion_registered_evaluated_and_reused(res, tiny_model_dir, tiny_adapter_dir):
    tracking = res["mlflow"]
    parent = champion(res, tiny_model_dir, tiny_adapter_dir)
    result = materialize(res, tiny_model_dir, with_eval=True)
    assert result.success
    value = result.output_for_node(STEP)
    assert value["tuning"] == "dpo" and value["parent_version"] == parent and value["version"] == "2"
    rates = value["heldout_win_rate"]
    assert rates["after"]["estimate"] > rates["before"]["estimate"]
    assert rates["before"]["n"] == (res["df"]["split"] == "heldout").sum()
    assert 0 <= rates["after"]["low"] <= rates["after"]["estimate"] <= rates["after"]["high"] <= 1

    mv = tracking.get_version(MODEL, "2")
    assert mv.tags["genops.tuning"] == "dpo" and mv.tags["genops.parent_version"] == parent
    assert tracking.alias(MODEL, CHALLENGER).version == "2" and tracking.alias(MODEL, CHAMPION).version == parent
    assert mv.source == f"models:/{value['model_id']}"
    run = tracking.client().get_run(value["run_id"])
    assert run.info.status == "FINISHED"
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == [f"{TASK}-preference-train",
                                                                   f"{TASK}-preference-heldout"]
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [value["dataset_digests"]["train"][:36],
                                                                     value["dataset_digests"]["heldout"][:36]]
    history = tracking.client().get_metric_history(value["run_id"], "reward_accuracy")
    assert [m.step for m in history] == list(range(1, TINY["max_steps"] + 1))
    assert run.data.metrics["heldout_win_rate_after"] == rates["after"]["estimate"]
    assert "plots/loss_curve.png" in {f.path for f in tracking.client().list_artifacts(value["run_id"], "plots")}

    # The same evaluation and gate as an SFT candidate, against the champion it was tuned from.
    report = result.output_for_node(TASK_REF.step("preference_eval_report"))
    assert report["candidate"]["version"] == "2" and report["champion"]["version"] == parent
    assert report["gate"]["baseline_role"] == "champion" and report["gate"]["passed"]  # margin -1
    checks = [e.event_specific_data for e in result.all_events
              if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION]
    assert [(c.check_name, c.asset_key.path[-1], c.passed) for c in checks] == [
        ("beats_champion", "preference_eval_report", True)]

    # Same champion, pairs, prompt and config: the registered version is reused, nothing trained.
    again = materialize(res, tiny_model_dir)
    assert again.success and again.output_for_node(STEP)["version"] == "2"
    assert again.asset_materializations_for_node(STEP)[0].metadata["reused"].value is True
    assert len(tracking.client().search_model_versions(f"name = '{MODEL}'")) == 2


def test_no_champion_fails_clearly(res, tiny_model_dir):
    result = materialize(res, tiny_model_dir)
    assert not result.success
    assert f"{MODEL} has no `champion`: preference tuning starts from the SFT champion" in failure(result)
    assert res["mlflow"].client().search_model_versions(f"name = '{MODEL}'") == []


def test_too_few_or_identical_pairs_fail_clearly(res, tiny_model_dir, tiny_adapter_dir):
    champion(res, tiny_model_dir, tiny_adapter_dir)
    result = materialize(res, tiny_model_dir, min_train_pairs=100)
    assert not result.success
    assert f"{SCHEMA}.preference_pairs has 10 'train' pair(s) (of 16 rows); preference tuning needs at least 100" \
        in failure(result)

    df = res["df"].copy()
    df.loc[2, "rejected_json"] = df.loc[2, "chosen_json"]
    write_pairs(res["warehouse"], df)
    result = materialize(res, tiny_model_dir)
    assert not result.success
    assert f"pair {df.loc[2, 'pair_id']}: chosen and rejected are the same answer" in failure(result)
    # Nothing was registered beside the champion, and no tuning run was left open.
    assert len(res["mlflow"].client().search_model_versions(f"name = '{MODEL}'")) == 1
