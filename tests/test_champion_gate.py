"""The promotion gate of a re-run whose candidate already is the champion: it is compared with
the champion before it (or the base model when there was none), never with itself, through the
interval branch production uses, on both sides of the margin; the check says which baseline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import duckdb
import pytest
from graph_support import register_version

from genops_assets.defs.evaluation.assets import build_evaluation_assets
from genops_assets.defs.evaluation.checks import build_evaluation_checks
from genops_assets.lib.hashing import file_digests, sha256_json
from genops_assets.lib.integrity import write_manifest
from genops_assets.lib.prompts import PRODUCTION, prompt_registry_name
from genops_assets.lib.tasks import TaskRef, load_task, read_raw_file
from resources.judge import JudgeResource
from resources.paths import GenopsHome
from resources.storage import LocalStorage
from resources.tracking import CHAMPION, MODEL_ID_TAG, MlflowTracking, registered_model_name
from resources.warehouse import DuckDBWarehouse, mart_schema

ROOT = Path(__file__).resolve().parents[1]
TASK = "support_triage"
MODEL = registered_model_name(TASK)
MART_SCHEMA = mart_schema(TASK)
TASK_REF = TaskRef(TASK, str(ROOT / "tasks"))
# eval_report generates with the tiny random Llama in-process
pytestmark = pytest.mark.graph


@pytest.fixture()
def res(tmp_path):
    home = tmp_path / "home"
    warehouse = DuckDBWarehouse(path=str(home / "warehouse.duckdb"))
    home.mkdir()
    spec = load_task(ROOT / "tasks", TASK)
    examples = [ex for path in spec.raw_files() for ex in read_raw_file(path, spec)][:3]
    con = duckdb.connect(warehouse.path)
    con.execute(f"create schema if not exists {MART_SCHEMA}")
    con.execute(f"create table {MART_SCHEMA}.golden_eval_dataset "
                "(example_id varchar, input_text varchar, output_json varchar)")
    con.executemany(f"insert into {MART_SCHEMA}.golden_eval_dataset values (?, ?, ?)",
                    [(f"g{i}", ex.input_text, json.dumps(ex.output)) for i, ex in enumerate(examples)])
    con.close()
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                              artifact_root=(tmp_path / "artifacts").as_uri())
    ref, _ = tracking.register_prompt(prompt_registry_name(TASK), spec.prompt, "the task folder's prompt")
    tracking.set_prompt_alias(ref.name, PRODUCTION, ref.version)
    return {"warehouse": warehouse, "home": GenopsHome(root=str(home)), "mlflow": tracking,
            "storage": LocalStorage(root=str(home / "objects")),
            "judge": JudgeResource(base_url="http://127.0.0.1:9/v1", model="judge", max_retries=0),
            "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))}


def evaluate(res: dict, tiny_model_dir: Path, adapter_dir: Path, version: str, margin: float) -> tuple[dict, dict]:
    """eval_report and its gate check for candidate ``version``: (value, check metadata)."""
    base = {"name": "tiny", "path": str(tiny_model_dir), "folder_digest": "tiny-base"}
    candidate = {"model_name": MODEL, "version": version, "adapter_dir": str(adapter_dir),
                 "adapter_digest": sha256_json(file_digests(adapter_dir)),
                 "model_id": res["mlflow"].get_version(MODEL, version).tags[MODEL_ID_TAG]}

    @dg.asset(name="base_model")
    def base_model_value() -> dict:
        return base

    @dg.asset(key=[TASK, "tuned_adapter"])
    def tuned_adapter_value() -> dict:
        return candidate

    config = {"max_examples": 3, "batch_size": 3, "base_few_shot": 0, "margin": margin}
    # A failed blocking check fails the run after eval_report has materialized.
    eval_report = build_evaluation_assets(TASK_REF)[0]
    result = dg.materialize([base_model_value, tuned_adapter_value, eval_report, *build_evaluation_checks(TASK_REF)],
                            resources=res, run_config={"ops": {TASK_REF.step("eval_report"): {"config": config}}},
                            raise_on_error=False)
    assert result.asset_materializations_for_node(TASK_REF.step("eval_report"))
    (check,) = [e.event_specific_data for e in result.all_events
                if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION]
    return result.output_for_node(TASK_REF.step("eval_report")), {**{k: v.value for k, v in check.metadata.items()},
                                                   "passed": check.passed}


def test_rerun_of_the_champion_is_gated_against_the_previous_champion(res, tiny_model_dir, tiny_adapter_dir,
                                                                      tmp_path):
    tracking = res["mlflow"]
    # v1 is the tiny adapter; v2 (the candidate) a copy of it with a digest of its own.
    other = tmp_path / "other-adapter"
    shutil.copytree(tiny_adapter_dir, other)
    (other / "README.md").write_text("a second adapter\n")
    write_manifest(other)  # a new adapter: its files recorded again
    prompt = tracking.resolve_prompt(TASK_REF.load())
    v1 = register_version(tracking, prompt, tiny_adapter_dir, tiny_model_dir)
    v2 = register_version(tracking, prompt, other, tiny_model_dir)
    tracking.promote(MODEL, v1, {})
    tracking.promote(MODEL, v2, {})
    assert tracking.alias(MODEL, CHAMPION).version == v2

    # The candidate is the champion: the champion before it is evaluated and is the baseline.
    value, check = evaluate(res, tiny_model_dir, other, v2, margin=0.01)
    gate = value["gate"]
    assert (gate["baseline_role"], gate["baseline_name"]) == ("previous champion", f"previous champion v{v1}")
    assert (check["baseline_role"], check["baseline_name"]) == ("previous champion", f"previous champion v{v1}")
    assert value["previous_champion"]["version"] == v1 and value["champion"] is None
    assert gate["improvement_low"] is not None  # the interval branch decided
    # The interval of the paired improvement against v1 does not clear a margin above its lower
    # bound, and clears one below it; a comparison with itself would pass at any margin <= 0.
    low = gate["improvement_low"]
    failing, check = evaluate(res, tiny_model_dir, other, v2, margin=low + 0.01)
    assert failing["gate"]["passed"] is False and check["passed"] is False
    passing, check = evaluate(res, tiny_model_dir, other, v2, margin=low - 0.01)
    assert passing["gate"]["passed"] is True and check["passed"] is True
    labels = {json.loads(line)["model"] for line in Path(passing["predictions_file"]).read_text().splitlines()}
    assert f"previous champion v{v1}" in labels and f"candidate v{v2}" in labels
    # The candidate's scores are its MLflow model's metrics too (MLflow's model view); the others' are not.
    logged = tracking.client().get_logged_model(tracking.get_version(MODEL, v2).tags[MODEL_ID_TAG])
    scores = {m.key: m.value for m in logged.metrics}
    assert scores["candidate.mean_field_exact_match"] == pytest.approx(
        passing["candidate"]["metrics"]["mean_field_exact_match"])
    assert not [k for k in scores if not k.startswith("candidate.")]


def test_rerun_of_a_first_champion_is_gated_against_the_base_model(res, tiny_model_dir, tiny_adapter_dir):
    tracking = res["mlflow"]
    v1 = register_version(tracking, tracking.resolve_prompt(TASK_REF.load()), tiny_adapter_dir, tiny_model_dir)
    tracking.promote(MODEL, v1, {})
    value, check = evaluate(res, tiny_model_dir, tiny_adapter_dir, v1, margin=0.0)
    assert (value["gate"]["baseline_role"], value["gate"]["baseline_name"]) == ("base model", "base model")
    assert check["baseline_role"] == "base model"
    assert value["champion"] is None and value["previous_champion"] is None
    assert value["gate"]["baseline"] == value["base"]["metrics"][value["gate"]["primary_metric"]]
