"""A task's tuned judge: a tiny LoRA judge trains on pairs in both orders, is registered in
MLflow, and the local judge server serves it as ``<task>:judge`` only while alias ``certified``
points at it; the judge_adapter asset moves that alias only on a passing certificate."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from graph_support import free_port, load_graph, materialized

from genops_assets.lib.hashing import sha256_dir
from genops_assets.lib.judge_tuning import judge_examples, probe_training_pairs
from genops_assets.lib.judging import BUILTIN_RUBRICS, ChatJudge, load_rubrics
from genops_assets.lib.tasks import load_task
from genops_assets.serving import control
from resources.judge import CERTIFIED, JudgeResource, judge_model_name
from resources.tracking import MlflowTracking

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
TASK = "support_triage"


def examples(n: int = 4) -> list[tuple[str, str, dict]]:
    rows = []
    for line in (REPO / "tasks" / TASK / "examples.jsonl").read_text().splitlines()[:n]:
        row = json.loads(line)
        rows.append((f"e{len(rows)}", row.pop("message"), row))
    return rows


def tracking(tmp_path: Path) -> MlflowTracking:
    (tmp_path / "mlflow").mkdir(exist_ok=True)
    return MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}",
                          artifact_root=(tmp_path / "mlflow" / "artifacts").as_uri())


def test_a_tiny_lora_judge_is_served_as_the_task_judge_only_when_certified(tiny_model_dir, home, tmp_path):
    from genops_assets.defs.judge_tuning.assets import register_judge_version
    from genops_assets.lib.training import LoraTrainConfig, train_lora

    spec = load_task(REPO / "tasks", TASK)
    rubric = load_rubrics(BUILTIN_RUBRICS)["pairwise_quality"]
    train = judge_examples(rubric, probe_training_pairs(examples(2), spec))
    cfg = LoraTrainConfig(rank=4, alpha=8, max_steps=2, batch_size=2, max_length=2048, eval_every=0,
                          save_every=100, log_every=1, learning_rate=5e-3)
    result = train_lora(tiny_model_dir, train, [], cfg, tmp_path / "adapter", tmp_path / "work")
    assert result.steps == 2 and not result.skipped_too_long

    mlflow = tracking(tmp_path)
    model_name = judge_model_name(TASK)
    base = {"path": str(tiny_model_dir), "folder_digest": sha256_dir(tiny_model_dir)}
    with mlflow.run(f"genops/{TASK}", "judge", {}) as run_id:
        mv, _ = register_judge_version(mlflow, model_name, run_id, tmp_path / "adapter", base, {}, "test judge")

    judge = JudgeResource(local_state_dir=str(home / "judge"), local_port=free_port(), tracking_uri=mlflow.tracking_uri)
    # No alias yet: the configured judge (the base model on the local judge server).
    plain = judge.connect(str(tiny_model_dir), task=TASK)
    assert (plain.model, plain.model_version) == ("base", "")
    messages = train[0].messages

    mlflow.set_alias(model_name, CERTIFIED, mv.version)
    tuned = judge.connect(str(tiny_model_dir), task=TASK)
    assert tuned.model == f"{TASK}:judge" and tuned.base_url == plain.base_url
    assert tuned.model_version == f"{model_name}/{mv.version}"
    assert control.read_state(home / "judge").versions[f"{TASK}:judge"] == mv.version
    verdict, base_verdict = tuned.choose(messages, rubric.choices), plain.choose(messages, rubric.choices)
    assert verdict.choice in rubric.choices and sum(verdict.probabilities.values()) == pytest.approx(1.0)
    # The adapter answers, not the base model under another name.
    assert verdict.probabilities != pytest.approx(base_verdict.probabilities, abs=1e-6)
    # Another task has no certified judge; a judge trained on another base model is not used.
    assert judge.connect(str(tiny_model_dir), task="product_qa").model == "base"
    remote = JudgeResource(base_url="http://127.0.0.1:9/v1", model="big-judge", tracking_uri=mlflow.tracking_uri,
                           local_state_dir=str(home / "judge"), local_port=judge.local_port)
    assert remote.connect("/another/base-model", task=TASK).model == "big-judge"
    assert remote.model_copy(update={"use_certified": False}).connect(str(tiny_model_dir), task=TASK).model == \
        "big-judge"
    assert remote.connect(str(tiny_model_dir), task=TASK).model == f"{TASK}:judge"

    # The fetched adapter is checked against the per-file digests recorded at registration.
    from genops_assets.lib.integrity import IntegrityError

    fetched = home / "judge" / "registry" / model_name / f"v{mv.version}"
    weights = next(fetched.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(IntegrityError, match=f"{model_name} v{mv.version}: .*{weights.name} was changed"):
        judge.connect(str(tiny_model_dir), task=TASK)


# -- the asset ---------------------------------------------------------------------------

@dataclass
class _Certificate:
    """What the judge_adapter asset reads of a certificate (lib/judge_certificate.Certificate)."""

    passed: bool
    checks: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    labels_needed: int | None = None

    def as_dict(self) -> dict:
        return {"passed": self.passed, "checks": self.checks, "failures": self.failures,
                "labels_needed": self.labels_needed}


@pytest.fixture()
def certificate(monkeypatch):
    """A stand-in of ``lib/judge_certificate`` whose verdict the test sets (``outcome["passed"]``).
    It still asks the served judge every probe, both orders, so the version under certification
    must answer; what it was asked is recorded."""
    outcome = {"passed": True, "asked": []}

    def certify(judge, rubric, human, probes, thresholds, repeats=2, seed=0, log=print):
        items = [(rubric.render(input=p.input_text, reference="(none)", response_a=a, response_b=b), rubric.choices,
                  rubric.version) for p in probes for a, b in ((p.good, p.bad), (p.bad, p.good))]
        verdicts = judge.choose_many(items)
        outcome["asked"].append((judge.model, len(human), len(verdicts)))
        assert all(not hasattr(v, "error") for v in verdicts), verdicts
        if outcome["passed"]:
            return _Certificate(True, {"probe_accuracy": {"value": 1.0, "threshold": 0.9, "passed": True}})
        return _Certificate(False, {"probe_accuracy": {"value": 0.55, "threshold": 0.9, "passed": False},
                                    "human_kappa": {"value": None, "threshold": 0.4, "passed": False}},
                            ["probe_accuracy 0.550 < 0.9", "human_kappa not computed"], labels_needed=42)

    module = types.ModuleType("genops_assets.lib.judge_certificate")
    module.certify = certify
    module.human_choices_from_frame = lambda df: [tuple(r) for r in df.itertuples(index=False)]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return outcome


def write_marts(warehouse_path: Path, golden_input: str | None = None) -> None:
    """The marts judge_adapter reads: sft_dataset, golden_eval_dataset and human_judgements."""
    import duckdb

    rows = examples(12)
    with duckdb.connect(str(warehouse_path)) as con:
        con.execute("create schema if not exists marts_support_triage")
        con.execute("create or replace table marts_support_triage.sft_dataset (example_id varchar, input_text "
                    "varchar, output_json varchar, split varchar)")
        con.executemany("insert into marts_support_triage.sft_dataset values (?, ?, ?, 'train')",
                        [(i, t, json.dumps(o)) for i, t, o in rows[:6]])
        con.execute("create or replace table marts_support_triage.golden_eval_dataset (example_id varchar, "
                    "input_text varchar, output_json varchar)")
        con.executemany("insert into marts_support_triage.golden_eval_dataset values (?, ?, ?)",
                        [(i, t, json.dumps(o)) for i, t, o in rows[6:9]])
        con.execute("create or replace table marts_support_triage.human_judgements (item_id varchar, example_id "
                    "varchar, input_text varchar, reference_json varchar, response_1 varchar, response_2 varchar, "
                    "model_1 varchar, model_2 varchar, human_choice varchar, n_ratings integer, agreement double, "
                    "source varchar, split varchar)")
        good, bad = json.dumps(rows[9][2]), json.dumps({**rows[9][2], "priority": "low"})
        con.executemany("insert into marts_support_triage.human_judgements values (?, null, ?, null, ?, ?, 'reference',"
                        " 'base', ?, 3, 1.0, ?, ?)", [
                            ("h1", golden_input or rows[9][1], good, bad, "1", "live", "train"),
                            ("h2", rows[10][1], bad, good, "2", "live", "train"),
                            ("h3", rows[11][1], good, bad, "both_bad", "live", "train"),
                            ("h4", rows[7][1], good, bad, "1", "golden", "certify")])


def run_judge_tuning(defs, instance, tiny_model_dir, steps: int = 1, raise_on_error: bool = True):
    import dagster as dg

    job = defs.resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        run_config={"ops": {"base_model": {"config": {"model_path": str(tiny_model_dir)}},
                            "support_triage__judge_adapter": {"config": {
                                "max_steps": steps, "batch_size": 2, "rank": 4, "alpha": 8, "eval_every": 0,
                                "save_every": 100, "log_every": 1, "max_length": 2048, "probe_examples": 3}}}},
        instance=instance, raise_on_error=raise_on_error,
        asset_selection=[dg.AssetKey("base_model"), dg.AssetKey([TASK, "judge_adapter"])])


def test_judge_adapter_registers_certifies_and_moves_the_alias_only_on_a_pass(tiny_model_dir, home, certificate):
    import dagster as dg

    home.mkdir(parents=True)
    write_marts(home / "warehouse.duckdb")
    defs = load_graph(home, judge_port=free_port())
    mlflow, judge = defs.resources["mlflow"], defs.resources["judge"]
    model_name = judge_model_name(TASK)
    with dg.DagsterInstance.ephemeral() as instance:
        first = run_judge_tuning(defs, instance, tiny_model_dir)
        value = first.output_for_node("support_triage__judge_adapter")
        assert "judge_adapter" in materialized(first)
        assert value["certified"] and value["version"] == "1" and not value["reused"]
        assert value["counts"]["human_pairs"] == 2  # both_bad left out, the certify row never read for training
        assert value["counts"]["probe_pairs"] > 0
        # Certified on the served version (judge-v1), with the held-out human label only.
        assert certificate["asked"][-1][:2] == (f"{TASK}:judge-v1", 1)
        assert mlflow.alias(model_name, CERTIFIED).version == "1"
        assert judge.connect(str(tiny_model_dir), task=TASK).model == f"{TASK}:judge"
        registered = mlflow.get_version(model_name, "1")
        assert registered.tags["genops.adapter_digest"] == value["adapter_digest"]
        assert registered.tags["genops.certificate_passed"] == "True"

        # Same inputs: the registered version is reused, not trained again.
        again = run_judge_tuning(defs, instance, tiny_model_dir).output_for_node("support_triage__judge_adapter")
        assert again["reused"] and again["version"] == "1"

        # A new version that fails its certificate leaves the certified one in place.
        certificate["passed"] = False
        failed = run_judge_tuning(defs, instance, tiny_model_dir, steps=2)
        out = failed.output_for_node("support_triage__judge_adapter")
        assert out["version"] == "2" and not out["certified"] and out["certified_version"] == "1"
        assert mlflow.alias(model_name, CERTIFIED).version == "1"
        meta = next(m for m in failed.asset_materializations_for_node("support_triage__judge_adapter")).metadata
        assert meta["missed_by"].value == {"probe_accuracy": {"value": 0.55, "threshold": 0.9, "missed_by": 0.35},
                                           "human_kappa": {"value": "not computed", "threshold": 0.4,
                                                           "missed_by": "not computed"}}
        assert meta["labels_needed"].value == 42 and meta["previous_certified_version"].value == "1"


def test_a_golden_input_in_the_human_train_rows_stops_judge_tuning(tiny_model_dir, home, certificate):
    import dagster as dg

    home.mkdir(parents=True)
    golden_input = examples(12)[7][1]
    write_marts(home / "warehouse.duckdb", golden_input=golden_input)
    defs = load_graph(home, judge_port=free_port())
    with dg.DagsterInstance.ephemeral() as instance:
        result = run_judge_tuning(defs, instance, tiny_model_dir, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    error = str(failure.event_specific_data.error)
    assert "GoldenLeakError" in error and "human:h1 (human): input is a golden input" in error
    assert certificate["asked"] == []
    assert defs.resources["mlflow"].alias(judge_model_name(TASK), CERTIFIED) is None


def test_two_versions_served_under_one_name_never_share_cached_verdicts(tmp_path):
    from types import SimpleNamespace

    from genops_assets.lib.cache import CallCache

    calls = []

    def create(**kwargs):
        calls.append(kwargs["model"])
        return SimpleNamespace(usage=None, choices=[SimpleNamespace(message=SimpleNamespace(content="A"),
                                                                    logprobs=None)])

    client = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))
    cache = CallCache(tmp_path / "calls.sqlite")
    messages = [{"role": "user", "content": "which?"}]
    for version in ("m/1", "m/1", "m/2"):
        ChatJudge("http://127.0.0.1:9/v1", f"{TASK}:judge", cache=cache, client=client,
                  model_version=version).choose(messages, ("A", "B", "C"))
    assert len(calls) == 2  # v1 once (then cached), v2 asked again
    ChatJudge("http://127.0.0.1:9/v1", f"{TASK}:judge", cache=cache, client=client).choose(messages, ("A", "B", "C"))
    assert len(calls) == 3


@pytest.mark.graph
def test_the_judge_bench_seeds_choices_and_compares_both_certificates(tiny_model_dir, tmp_path, certificate,
                                                                      monkeypatch):
    """The lead's real-model command, end to end on the tiny model: marts, seeded choices,
    the base judge's certificate, the tuned judge's, both in the report."""
    from genops_assets.bench.judge_tuning import run

    home = tmp_path / "bench-home"
    monkeypatch.setenv("GENOPS_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    monkeypatch.setenv("GENOPS_JUDGE_PORT", str(free_port()))
    lines = []
    report = run(home, steps=1, model_path=str(tiny_model_dir), items=24, log=lines.append,
                 judge_config={"batch_size": 2, "rank": 4, "alpha": 8, "eval_every": 0, "save_every": 100,
                               "max_length": 2048, "probe_examples": 2, "max_train_examples": 8})
    seeded = report["seeded"]["by_split_choice"]
    assert {k.split("/")[0] for k in seeded} == {"train", "certify"}
    # Raters right 90% of the time: the reference's slot wins most items of each split.
    assert sum(v for k, v in seeded.items() if k.endswith(("/1", "/2"))) > 0.8 * report["seeded"]["items"]
    assert report["base_judge"]["model"] == "base" and report["tuned_judge"]["model"] == "support_triage:judge-v1"
    assert [a[0] for a in certificate["asked"]] == ["base", "support_triage:judge-v1"]
    assert certificate["asked"][0][1] == certificate["asked"][1][1] > 0  # the same held-out labels for both
    assert (home / "bench" / "judge_tuning.json").is_file()
    table = next(line for line in lines if line.startswith("check"))
    assert "base judge" in table and "tuned judge" in table
