"""judge_certificate as an asset (warehouse marts in, MLflow run out) over a real HTTP judge
client talking to a scripted stand-in judge service, and what AutoSxS does with the result:
marked uncertified, or certified, with the prediction-powered win rate beside the judge's."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import duckdb
import pytest
from graph_support import free_port
from judge_standin import StandInJudge, completion

from genops_assets.defs.evaluation.assets import build_evaluation_assets
from genops_assets.lib.judging import BUILTIN_RUBRICS, load_rubrics
from genops_assets.lib.probes import answer_text
from genops_assets.lib.prompts import PRODUCTION, prompt_registry_name
from genops_assets.lib.tasks import TaskRef, load_task, read_raw_file
from resources.judge import JudgeResource
from resources.paths import GenopsHome
from resources.tracking import MlflowTracking
from resources.warehouse import DuckDBWarehouse, mart_schema

ROOT = Path(__file__).resolve().parents[1]
TASK = "support_triage"
REF = TaskRef(TASK, str(ROOT / "tasks"))
SCHEMA = mart_schema(TASK)
_, judge_certificate, sxs_evaluation = build_evaluation_assets(REF)
HUMAN_COLUMNS = ("item_id varchar, example_id varchar, input_text varchar, reference_json varchar, "
                 "response_1 varchar, response_2 varchar, model_1 varchar, model_2 varchar, human_choice varchar, "
                 "n_ratings integer, agreement double, source varchar, split varchar")


def oracle_script(good: set[str]):
    """Pairwise: the side showing a known-good text (C when neither or both); pointwise: 3."""
    def script(call: int, body: dict) -> tuple[int, dict]:
        if body.get("guided_choice") != ["A", "B", "C"]:
            return 200, completion("3", {"3": 1.0})
        user = body["messages"][-1]["content"]
        a_at, b_at = user.index("Response A:"), user.index("Response B:")
        in_a, in_b = (any(t in seg for t in good) for seg in (user[a_at:b_at], user[b_at:]))
        choice = "A" if in_a and not in_b else "B" if in_b and not in_a else "C"
        return 200, completion(choice, {choice: 1.0})
    return script


def always_a(call: int, body: dict) -> tuple[int, dict]:
    return 200, completion("A" if body.get("guided_choice") == ["A", "B", "C"] else "3", {})


@pytest.fixture()
def env(tmp_path):
    """A data directory with the golden mart (4 examples), MLflow with the task's prompt as
    `production`, and the base model's value; the judge is set per test."""
    home = tmp_path / "home"
    home.mkdir()
    spec = load_task(ROOT / "tasks", TASK)
    examples = [ex for path in spec.raw_files() for ex in read_raw_file(path, spec)][:4]
    golden = [(f"g{i}", ex.input_text, json.dumps(ex.output)) for i, ex in enumerate(examples)]
    warehouse = DuckDBWarehouse(path=str(home / "warehouse.duckdb"))
    con = duckdb.connect(warehouse.path)
    con.execute(f"create schema {SCHEMA}")
    con.execute(f"create table {SCHEMA}.golden_eval_dataset (example_id varchar, input_text varchar, "
                "output_json varchar)")
    con.executemany(f"insert into {SCHEMA}.golden_eval_dataset values (?, ?, ?)", golden)
    con.close()
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                              artifact_root=(tmp_path / "artifacts").as_uri())
    ref, _ = tracking.register_prompt(prompt_registry_name(TASK), spec.prompt, "the task folder's prompt")
    tracking.set_prompt_alias(ref.name, PRODUCTION, ref.version)

    @dg.asset(name="base_model")
    def base_model() -> dict:
        return {"name": "tiny", "path": "unused", "folder_digest": "base-digest"}

    good = {answer_text(ex.output) for ex in examples}
    return {"warehouse": warehouse, "home": GenopsHome(root=str(home)), "mlflow": tracking, "tmp": tmp_path,
            "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io")), "base_model": base_model,
            "good": good}


def resources(env: dict, judge_url: str) -> dict:
    return {k: env[k] for k in ("warehouse", "home", "mlflow", "io_manager")} | {
        "judge": JudgeResource(base_url=judge_url, model="judge", max_retries=0)}


def add_human_rows(warehouse: DuckDBWarehouse, rows: list[tuple]) -> None:
    con = duckdb.connect(warehouse.path)
    con.execute(f"create table if not exists {SCHEMA}.human_judgements ({HUMAN_COLUMNS})")
    con.executemany(f"insert into {SCHEMA}.human_judgements values ({', '.join('?' * 13)})", rows)
    con.close()


def certify_once(env: dict, res: dict) -> tuple[dict, dict]:
    result = dg.materialize([env["base_model"], judge_certificate], resources=res)
    assert result.success
    node = REF.step("judge_certificate")
    meta = {k: v.value for k, v in result.asset_materializations_for_node(node)[0].metadata.items()}
    return result.output_for_node(node), meta


def test_without_ratings_the_certificate_measures_the_rest_and_does_not_certify(env):
    with StandInJudge(oracle_script(env["good"]), free_port()) as standin:
        value, meta = certify_once(env, resources(env, standin.url))
    assert set(value) == {"certified", "judge_model", "judge_url", "rubric", "rubric_digest", "certificate",
                          "mlflow_run_id"}
    assert value["certified"] is False and value["judge_model"] == "judge" and value["judge_url"] == standin.url
    cert = value["certificate"]
    assert cert["checks"]["probe_accuracy"]["value"] == 1.0 and cert["checks"]["position_consistency"]["value"] == 1.0
    assert cert["checks"]["human_kappa"]["value"] is None and cert["statistics"]["human"]["kappa"] == "not computed"
    assert cert["labels_needed"] == 30 and "no human labels yet" in cert["labels_needed_reason"]
    assert "human_judgements does not exist" in meta["human_labels_source"]
    # 4 golden examples, 3 corruptions each; (1 + 2 repeats) calls per pair.
    assert cert["statistics"]["probe"]["n"] == 12 and standin.calls == 36

    client = env["mlflow"].client()
    run = client.get_run(value["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == f"genops/{TASK}"
    tags = run.data.tags
    assert tags["genops.kind"] == "judge_certificate" and tags["genops.judge_certified"] == "false"
    assert tags["genops.judge_model"] == "judge" and tags["genops.judge_url"] == standin.url
    assert tags["genops.judge_rubric"] == value["rubric"] and value["rubric"].startswith("pairwise_quality@")
    assert tags["genops.judge_rubric_digest"] == value["rubric_digest"] and len(value["rubric_digest"]) == 64
    assert run.data.metrics["cert_probe_accuracy"] == 1.0 and run.data.metrics["cert_passed"] == 0.0
    assert "cert_human_kappa" not in run.data.metrics  # not computed, so not logged as a number
    local = client.download_artifacts(value["mlflow_run_id"], "judge_certificate/certificate.json",
                                      str(env["tmp"]))
    assert json.loads(Path(local).read_text())["checks"]["human_labels"]["value"] == 0.0


def human_rows(good: str, bad: str, n: int, split: str, start: int = 0, wrong: bool = False) -> list[tuple]:
    """``n`` comparisons of ``good`` and ``bad`` (alternating sides); people pick the good one,
    or the bad one when ``wrong``."""
    rows = []
    for i in range(start, start + n):
        r1, r2 = (good, bad) if i % 2 == 0 else (bad, good)
        choice = ("1" if r1 == good else "2") if not wrong else ("2" if r1 == good else "1")
        rows.append((f"item{i}", None, f"live question {i}", None, r1.replace("#", str(i)), r2.replace("#", str(i)),
                     "support_triage:v2", "base", choice, 3, 1.0, "live", split))
    return rows


def test_an_oracle_judge_is_certified_on_the_certify_split_only(env):
    # 30 certify rows the oracle agrees with; 10 train rows where people chose the other answer,
    # which would sink the agreement if they were read.
    good, bad = '{"category": "GOOD #"}', '{"category": "bad #"}'
    add_human_rows(env["warehouse"], human_rows(good, bad, 30, "certify")
                   + human_rows(good, bad, 10, "train", start=100, wrong=True))
    with StandInJudge(oracle_script(env["good"] | {f'"GOOD {i}"' for i in range(200)}), free_port()) as standin:
        value, meta = certify_once(env, resources(env, standin.url))
    assert value["certified"] is True, value["certificate"]["failures"]
    human = value["certificate"]["statistics"]["human"]
    assert human["n"] == 30 and human["kappa"] == 1.0 and human["confusion_matrix"] == [[15, 0, 0], [0, 15, 0],
                                                                                        [0, 0, 0]]
    assert meta["certified"] is True and meta["labels_needed"] == 30
    assert env["mlflow"].client().get_run(value["mlflow_run_id"]).data.tags["genops.judge_certified"] == "true"


def sxs_inputs(env: dict, certificate: dict) -> list[dg.AssetsDefinition]:
    """eval_report (candidate v3 against the base model on 6 golden examples) and the given
    judge_certificate value, as upstream assets."""
    preds = env["tmp"] / "predictions.jsonl"
    preds.write_text("".join(json.dumps({"model": m, "example_id": f"g{i}", "input": f"my invoice {i} is wrong",
                                         "reference": {}, "prediction": p}) + "\n"
                             for i in range(6) for m, p in (("candidate v3", f"GOOD {i}"), ("base", f"bad {i}"))))

    @dg.asset(key=[TASK, "eval_report"])
    def eval_report() -> dict:
        return {"candidate": {"version": "3"}, "champion": None, "predictions_file": str(preds)}

    @dg.asset(key=[TASK, "judge_certificate"])
    def certificate_value() -> dict:
        return certificate

    return [env["base_model"], eval_report, certificate_value]


def run_sxs(env: dict, res: dict, certificate: dict) -> tuple[dict, dict]:
    upstream = sxs_inputs(env, certificate)
    assert dg.materialize(upstream, resources=res).success
    result = dg.materialize([*upstream, sxs_evaluation], selection=[sxs_evaluation], resources=res)
    node = REF.step("sxs_evaluation")
    meta = {k: v.value for k, v in result.asset_materializations_for_node(node)[0].metadata.items()}
    return result.output_for_node(node), meta


def test_autosxs_marks_an_uncertified_judge_and_anchors_the_win_rate_on_people(env):
    # People compared candidate v3 with the base model on g0-g2 (certify split): the candidate
    # wins g0 and g1, g2 is a tie (both bad). A train-split row and another version's row do not count.
    add_human_rows(env["warehouse"], [
        ("i0", "g0", "q", None, "GOOD 0", "bad 0", "support_triage:v3", "base", "1", 3, 1.0, "golden", "certify"),
        ("i1", "g1", "q", None, "bad 1", "GOOD 1", "base", "support_triage:v3", "2", 3, 1.0, "golden", "certify"),
        ("i2", "g2", "q", None, "GOOD 2", "bad 2", "support_triage:v3", "base", "both_bad", 3, 1.0, "golden",
         "certify"),
        ("i3", "g3", "q", None, "GOOD 3", "bad 3", "support_triage:v3", "base", "2", 3, 1.0, "live", "train"),
        ("i4", "g4", "q", None, "GOOD 4", "bad 4", "support_triage:v2", "base", "2", 3, 1.0, "golden", "certify"),
    ])
    with StandInJudge(oracle_script({"GOOD"}), free_port()) as standin:
        res = resources(env, standin.url)
        failed = {"certified": False, "judge_model": "judge", "judge_url": standin.url, "rubric": "x",
                  "rubric_digest": "x", "certificate": {"failures": ["position_consistency: 0.000"]},
                  "mlflow_run_id": "cert-run"}
        value, meta = run_sxs(env, res, failed)
        rubric = load_rubrics(BUILTIN_RUBRICS)["pairwise_quality"]
        passed = {**failed, "certified": True, "rubric": f"{rubric.name}@{rubric.version}"}
        certified_value, certified_meta = run_sxs(env, res, passed)
        _, other_meta = run_sxs(env, res, {**passed, "rubric": "pairwise_quality@old"})

    assert value["judge_certified"] is False and meta["judge_certified"] is False
    assert "UNCERTIFIED judge judge" in meta["judge_status"] and "position_consistency" in meta["judge_status"]
    assert meta["win_rate"]["judge_certified"] is False and meta["win_rate"]["estimate"] == 1.0
    html = Path(value["report_html"]).read_text()
    assert "UNCERTIFIED JUDGE - " in html and "not a result" in html
    client = env["mlflow"].client()
    tags = client.get_run(value["mlflow_run_id"]).data.tags
    assert tags["genops.judge_certified"] == "false" and tags["genops.judge_certificate_run_id"] == "cert-run"

    # Judge: the candidate wins all 6. Labelled g0-g2: people 1, 1, 0 (tie); judge 1, 1, 1.
    # Prediction-powered: mean judge on g3-g5 (1.0) + mean(human - judge) on g0-g2 (-1/3) = 2/3;
    # SE sqrt(0/3 + var(0, 0, -1)/3) = sqrt((1/3)/3) = 1/3; interval 2/3 -/+ 1.96/3.
    ppi = meta["win_rate_ppi"]
    assert (ppi["n_labelled"], ppi["n_unlabelled"]) == (3, 3)
    assert ppi["estimate"] == pytest.approx(2 / 3) and ppi["low"] == pytest.approx(2 / 3 - 1.959964 / 3, abs=1e-5)
    assert meta["judge_human"]["n"] == 3 and meta["judge_human"]["accuracy"] == pytest.approx(2 / 3)
    assert "win rate, prediction-powered" in html

    assert certified_value["judge_certified"] is True and certified_meta["win_rate"]["judge_certified"] is True
    assert "UNCERTIFIED" not in Path(certified_value["report_html"]).read_text()
    assert client.get_run(certified_value["mlflow_run_id"]).data.tags["genops.judge_certified"] == "true"
    assert other_meta["judge_certified"] is False and "UNCERTIFIED rubric" in other_meta["judge_status"]


def test_a_judge_that_always_answers_a_is_not_certified_with_plenty_of_labels(env):
    good, bad = '{"category": "GOOD #"}', '{"category": "bad #"}'
    add_human_rows(env["warehouse"], human_rows(good, bad, 30, "certify"))
    with StandInJudge(always_a, free_port()) as standin:
        value, meta = certify_once(env, resources(env, standin.url))
    cert = value["certificate"]
    assert value["certified"] is False and meta["certified"] is False
    assert cert["checks"]["position_consistency"]["value"] == 0.0 and cert["checks"]["probe_accuracy"]["value"] == 0.0
    assert cert["checks"]["human_kappa"]["value"] == 0.0 and cert["labels_needed"] is None
    assert "cannot certify" in cert["labels_needed_reason"]
