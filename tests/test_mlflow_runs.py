"""Every asset that records to MLflow ends its run FINISHED or FAILED, never RUNNING: a failure
injected inside the run of each family (tuning, evaluation, judge certificate and AutoSxS, prompt enhancement,
monitoring: prompt drift, online quality, serving metrics) fails the asset and leaves its run
FAILED. The deployment family moves registry aliases but opens no run.

Each test materializes the one asset in-process; its upstream values come from small assets
under the same keys, and the failure comes from a library call made inside the run."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import duckdb
import numpy as np
import pytest
from graph_support import free_port
from judge_standin import StandInJudge, completion

from genops_assets.defs.evaluation.assets import build_evaluation_assets
from genops_assets.defs.feedback.assets import request_log
from genops_assets.defs.monitoring.common import daily_partitions
from genops_assets.defs.monitoring.drift import build_drift_assets
from genops_assets.defs.monitoring.quality import build_quality_assets
from genops_assets.defs.monitoring.serving import build_serving_monitoring_assets
from genops_assets.defs.prompts.assets import build_prompt_assets
from genops_assets.defs.tuning.assets import build_tuning_assets
from genops_assets.lib.eval_report import SUMMARY_METRICS, GoldenEvaluation
from genops_assets.lib.evaluation import ModelEval
from genops_assets.lib.prompts import PRODUCTION, prompt_registry_name
from genops_assets.lib.tasks import TaskRef, load_task, read_raw_file
from genops_assets.lib.training import TrainingInputError
from resources.feedback_store import DuckDBFeedbackStore
from resources.judge import JudgeResource
from resources.paths import GenopsHome
from resources.storage import LocalStorage
from resources.tracking import MlflowTracking
from resources.trainer import SubprocessTrainer
from resources.warehouse import DuckDBWarehouse, mart_schema

ROOT = Path(__file__).resolve().parents[1]
TASK = "support_triage"
REF = TaskRef(TASK, str(ROOT / "tasks"))
MART_SCHEMA = mart_schema(TASK)
DAILY = daily_partitions("2026-01-01")
eval_report, judge_certificate, sxs_evaluation = build_evaluation_assets(REF)
_, prompt_drift = build_drift_assets(REF, DAILY)
(online_quality,) = build_quality_assets(REF, DAILY)
(serving_metrics,) = build_serving_monitoring_assets(REF, DAILY)
_, prompt_candidates = build_prompt_assets(REF)
(tuned_adapter,) = build_tuning_assets(REF)
DAY = "2026-03-01"
DAY_START = datetime(2026, 3, 1, tzinfo=UTC).timestamp()
INJECTED = "injected failure inside the run"


class Injected(RuntimeError):
    """The failure a test injects."""


def fail(*args, **kwargs):
    raise Injected(INJECTED)


def bad_training_data(*args, **kwargs):
    raise TrainingInputError(INJECTED)


def judge_script(call: int, body: dict) -> tuple[int, dict]:
    """Pairwise: a tie; pointwise: 3."""
    if body.get("guided_choice") == ["A", "B", "C"]:
        return 200, completion("C", {"C": 1.0})
    return 200, completion("3", {"3": 1.0})


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> MlflowTracking:
    """One MLflow store for the module (each test's runs carry their own names), with the task's
    prompt registered as `production`."""
    folder = tmp_path_factory.mktemp("mlflow")
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
                              artifact_root=(folder / "artifacts").as_uri())
    ref, _ = tracking.register_prompt(prompt_registry_name(TASK), load_task(ROOT / "tasks", TASK).prompt,
                                      "the task folder's prompt")
    tracking.set_prompt_alias(ref.name, PRODUCTION, ref.version)
    return tracking


@pytest.fixture()
def res(tmp_path, tracking):
    """Resources on a fresh data directory, with marts built from the task's examples."""
    home = tmp_path / "home"
    (home / "endpoint").mkdir(parents=True)
    warehouse = DuckDBWarehouse(path=str(home / "warehouse.duckdb"))
    spec = load_task(ROOT / "tasks", TASK)
    examples = [ex for path in spec.raw_files() for ex in read_raw_file(path, spec)][:16]
    rows = [(f"ex{i}", ex.input_text, json.dumps(ex.output)) for i, ex in enumerate(examples)]
    con = duckdb.connect(warehouse.path)
    con.execute(f"create schema if not exists {MART_SCHEMA}")
    con.execute(f"create table {MART_SCHEMA}.sft_dataset "
                "(example_id varchar, input_text varchar, output_json varchar, split varchar)")
    con.executemany(f"insert into {MART_SCHEMA}.sft_dataset values (?, ?, ?, ?)",
                    [(*row, "train" if i < 8 else "validation") for i, row in enumerate(rows[:12])])
    con.execute(f"create table {MART_SCHEMA}.golden_eval_dataset "
                "(example_id varchar, input_text varchar, output_json varchar)")
    con.executemany(f"insert into {MART_SCHEMA}.golden_eval_dataset values (?, ?, ?)", rows[12:])
    con.close()
    return {"warehouse": warehouse, "feedback_store": DuckDBFeedbackStore(warehouse=warehouse),
            "home": GenopsHome(root=str(home)), "storage": LocalStorage(root=str(home / "objects")),
            "mlflow": tracking, "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io")),
            # Replaced by a stand-in where a test reaches the judge.
            "judge": JudgeResource(base_url=f"http://127.0.0.1:{free_port()}/v1", model="judge", max_retries=0)}


def value_asset(name: str, value: dict) -> dg.AssetsDefinition:
    """An upstream asset of the task (the shared base model: its own) named ``name``, whose value is ``value``."""

    @dg.asset(key=name if name == "base_model" else [TASK, name])
    def upstream() -> dict:
        return value

    return upstream


def materialize_failing(target: dg.AssetsDefinition, upstream: list[dg.AssetsDefinition], res: dict,
                        **kwargs) -> None:
    """Materialize the upstream values, then ``target``, which must fail with the injected error."""
    if upstream:
        assert dg.materialize(upstream, resources=res).success
    result = dg.materialize([*upstream, target], selection=[target], resources=res, raise_on_error=False,
                            **kwargs)
    assert not result.success
    errors = [e.event_specific_data.error.to_string() for e in result.get_step_failure_events()]
    assert errors and all(INJECTED in e for e in errors), errors


def runs(tracking: MlflowTracking) -> list:
    from mlflow.entities import ViewType

    client = tracking.client()
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(experiments, run_view_type=ViewType.ALL)


def assert_run_failed(tracking: MlflowTracking, run_name_prefix: str) -> None:
    found = runs(tracking)
    assert [(r.info.run_name, r.info.status) for r in found if r.info.status == "RUNNING"] == []
    mine = [r for r in found if r.info.run_name.startswith(run_name_prefix)]
    assert mine, f"no run named {run_name_prefix}* in {[r.info.run_name for r in found]}"
    assert {r.info.status for r in mine} == {"FAILED"}


def base_model_value(path: str = "unused") -> dg.AssetsDefinition:
    return value_asset("base_model", {"name": "tiny", "path": path, "folder_digest": "base-digest"})


def predictions_file(tmp_path: Path) -> Path:
    """eval_report's predictions: the candidate (v3) and the base model on two golden examples."""
    path = tmp_path / "predictions.jsonl"
    rows = [{"model": model, "example_id": f"g{i}", "input": f"my invoice {i} is wrong", "reference": {},
             "prediction": answer, "valid_json": False, "field_match": {}}
            for i in range(2) for model, answer in (("candidate v3", "GOOD"), ("base (0-shot)", "BAD"))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def served(i: int, ts: float, version: str) -> dict:
    """A request record the way genops' server writes it."""
    return {"ts": ts, "request_id": f"chatcmpl-{i:04d}", "model": "champion", "served_by": "champion",
            "version": version, "prompt_version": "1", "status": 200, "prompt_tokens": 20, "completion_tokens": 8,
            "latency_s": 0.3, "finish_reason": "stop", "prompt_variables": {"message": f"ticket {i}"},
            "response": "GOOD"}


def load_requests(res: dict, count: int) -> None:
    log = Path(res["home"].root) / "endpoint" / "requests.jsonl"
    log.write_text("".join(json.dumps(served(i, DAY_START + 60 * i, "3")) + "\n" for i in range(count)))
    assert dg.materialize([request_log], resources=res).success


# -- tuning -------------------------------------------------------------------------------------


class BadDataTrainer(SubprocessTrainer):
    """A trainer whose training program reports bad input data."""

    def run(self, context, spec, on_record=None):
        bad_training_data()


def test_tuning_failure_ends_the_run_failed(res):
    # Bad data is not retried (the retry policy would train again), which keeps this test short.
    res = {**res, "trainer": BadDataTrainer()}
    materialize_failing(tuned_adapter, [base_model_value()], res,
                        run_config={"ops": {REF.step("tuned_adapter"): {"config": {"max_train_examples": 8}}}})
    assert_run_failed(res["mlflow"], "sft-")


# -- evaluation ---------------------------------------------------------------------------------


def canned_evaluation(spec) -> GoldenEvaluation:
    """Evaluations already made: the report is what fails."""
    metrics = {m: 0.5 for m in (*SUMMARY_METRICS, spec.primary_metric)} | {"n_examples": 2}
    base = ModelEval("base 0-shot", "base-digest", {**metrics, "rouge_l_summary": 0.1})
    candidate = ModelEval("v3", "candidate-digest", {**metrics, "rouge_l_summary": 0.2})
    return GoldenEvaluation(base, base, "base (0-shot)", candidate, "candidate v3", None, None)


def test_evaluation_failure_ends_the_run_failed(res, monkeypatch):
    spec = load_task(ROOT / "tasks", TASK)
    monkeypatch.setattr("genops_assets.defs.evaluation.assets.evaluate_golden",
                        lambda *a, **k: canned_evaluation(spec))
    monkeypatch.setattr("genops_assets.defs.evaluation.assets.compare_decoding",
                        lambda *a, **k: SimpleNamespace(section=lambda: ("Decoding", "", ""), mlflow_metrics=dict,
                                                        rows=list, metrics=()))
    monkeypatch.setattr("genops_assets.defs.evaluation.assets.write_eval_report", fail)
    adapter = value_asset("tuned_adapter", {"model_name": f"genops-{TASK}", "version": "3",
                                            "adapter_dir": "unused", "adapter_digest": "adapter-digest"})
    materialize_failing(eval_report, [base_model_value(), adapter], res,
                        run_config={"ops": {REF.step("eval_report"): {"config": {"base_few_shot": 0}}}})
    assert_run_failed(res["mlflow"], "eval-v3")


def uncertified() -> dg.AssetsDefinition:
    return value_asset("judge_certificate", {"certified": False, "mlflow_run_id": "cert-run"})


def test_judge_certificate_failure_ends_the_run_failed(res, monkeypatch):
    monkeypatch.setattr("genops_assets.lib.hashing.atomic_write_text", fail)
    with StandInJudge(judge_script, free_port()) as standin:
        res["judge"] = JudgeResource(base_url=standin.url, model="judge", max_retries=0)
        materialize_failing(judge_certificate, [base_model_value()], res, run_config={
            "ops": {REF.step("judge_certificate"): {"config": {"max_probe_examples": 1}}}})
        assert standin.calls > 0  # judged before the run opened
    assert_run_failed(res["mlflow"], "judge-certificate")


def test_autosxs_failure_ends_the_run_failed(res, monkeypatch, tmp_path):
    monkeypatch.setattr("genops_assets.lib.report.write_sxs_report", fail)
    report = value_asset("eval_report", {"candidate": {"version": "3"},
                                         "predictions_file": str(predictions_file(tmp_path))})
    with StandInJudge(judge_script, free_port()) as standin:
        res["judge"] = JudgeResource(base_url=standin.url, model="judge", max_retries=0)
        materialize_failing(sxs_evaluation, [base_model_value(), report, uncertified()], res)
        assert standin.calls > 0  # judged before the run opened
    assert_run_failed(res["mlflow"], "sxs-")


# -- prompts ------------------------------------------------------------------------------------


def test_prompt_enhancement_failure_ends_the_run_failed(res, monkeypatch, tmp_path):
    monkeypatch.setattr("genops_assets.lib.enhance.propose_candidates", fail)
    upstream = [base_model_value(), value_asset("prompt_templates", {}),
                value_asset("eval_report", {"predictions_file": str(predictions_file(tmp_path))}),
                value_asset("tuned_adapter", {"adapter_dir": "unused", "adapter_digest": "adapter-digest"})]
    materialize_failing(prompt_candidates, upstream, res)
    assert_run_failed(res["mlflow"], "prompt-enhancement")


# -- monitoring ---------------------------------------------------------------------------------


def test_prompt_drift_failure_ends_the_run_failed(res, monkeypatch, tmp_path):
    from genops_assets.lib.drift import DriftReference, calibrate
    from genops_assets.lib.embeddings import DIM

    rng = np.random.default_rng(0)
    train, heldout = rng.normal(size=(30, DIM)), rng.normal(size=(12, DIM))
    folder = tmp_path / "calibration"
    folder.mkdir()
    DriftReference(tuple(f"train {i}" for i in range(30)), train, ("golden 0",), heldout[:1],
                   calibrate(train, heldout, k=3), "random").save(folder)
    monkeypatch.setattr("genops_assets.lib.drift.write_projector", fail)
    materialize_failing(prompt_drift, [value_asset("drift_calibration", {"path": str(folder)})], res,
                        partition_key=DAY)
    assert_run_failed(res["mlflow"], "prompt-drift-")


def test_online_quality_failure_ends_the_run_failed(res, monkeypatch, tmp_path):
    load_requests(res, 4)
    monkeypatch.setattr("genops_assets.lib.online_quality.comparison_chart_png", fail)
    report = value_asset("eval_report", {"candidate": {"version": "3"}, "champion": None,
                                         "predictions_file": str(predictions_file(tmp_path))})
    with StandInJudge(judge_script, free_port()) as standin:
        res["judge"] = JudgeResource(base_url=standin.url, model="judge", max_retries=0)
        materialize_failing(online_quality, [base_model_value(), report, uncertified()], res, partition_key=DAY,
                            run_config={"ops": {REF.step("online_quality"): {"config": {"share": 1.0,
                                                                                         "min_samples": 1}}}})
        assert standin.calls == 4 + 2  # every live and golden answer judged before the run failed
    assert_run_failed(res["mlflow"], "online-quality-")


def test_serving_metrics_failure_ends_the_reopened_day_run_failed(res, monkeypatch):
    load_requests(res, 3)
    first = dg.materialize([serving_metrics], resources=res, partition_key=DAY)
    assert first.success
    run_id = first.asset_materializations_for_node(REF.step("serving_metrics"))[0].metadata["mlflow_run_id"].value
    assert res["mlflow"].client().get_run(run_id).info.status == "FINISHED"

    # The day's run is reopened by the re-materialization, then the artifacts cannot be written.
    monkeypatch.setattr("genops_assets.lib.hashing.atomic_dir", fail)
    materialize_failing(serving_metrics, [], res, partition_key=DAY)
    assert_run_failed(res["mlflow"], "serving_metrics-")
    day_runs = [r.info.run_id for r in runs(res["mlflow"]) if r.info.run_name.startswith("serving_metrics-")]
    assert day_runs == [run_id]  # one run per day, not one per load
