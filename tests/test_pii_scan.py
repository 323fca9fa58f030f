"""PII scans of frames, tables, files and whole data directories, and the blocking PII checks of
the marts (shipped data passes; a row with PII blocks tuning and is named)."""

from __future__ import annotations

import json
import pickle
import shutil
import sqlite3
from pathlib import Path

import dagster as dg
import duckdb
import pandas as pd
import pytest

from genops_assets.lib.pii_scan import scan_duckdb_table, scan_frame, scan_home, validate_no_pii

REPO = Path(__file__).resolve().parents[1]
EMAIL = "jo.mills@example.com"
CARD = "4111 1111 1111 1111"
SSN = "332-20-6469"
IBAN = "DE89 3704 0044 0532 0130 00"


def test_frame_findings_name_column_row_and_entity_never_the_value():
    df = pd.DataFrame({"example_id": ["e1", "e2", "e3"],
                       "input_text": ["my printer is broken", f"write to {EMAIL}", f"card {CARD}, ssn {SSN}"],
                       "score": [1, 2, 3]})
    found = scan_frame(df, table="sft", id_column="example_id")
    assert sorted((f.row, f.column, f.entity) for f in found) == [
        ("e2", "input_text", "EMAIL_ADDRESS"), ("e3", "input_text", "CREDIT_CARD"), ("e3", "input_text", "US_SSN")]
    text = json.dumps([f.as_dict() for f in found]) + " ".join(f.describe() for f in found)
    assert EMAIL not in text and CARD not in text and SSN not in text
    with pytest.raises(KeyError, match="id column 'nope'"):
        scan_frame(df, table="sft", id_column="nope")


@pytest.mark.parametrize(("number", "is_phone"), [
    ("168681", False),   # six digits that a numbering plan allows (a pager number): a count, not a contact
    ("1686812", True),   # seven: a subscriber number
    ("030 12345", True),
])
def test_a_phone_finding_needs_seven_digits(number, is_phone):
    from genops_assets.lib.guardrails.pii import _analyzer, find_pii

    text = f"tuning: step 2/2, loss 0.81, {number} tokens/s"
    raw = _analyzer().analyze(text=text, language="en", entities=["PHONE_NUMBER"])
    assert [text[r.start:r.end] for r in raw] == [number]  # Presidio itself reports each of them
    assert [f.entity for f in find_pii(text)] == (["PHONE_NUMBER"] if is_phone else [])


def test_duckdb_table_scans_varchar_columns(tmp_path):
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    con.execute("create schema s; create table s.t (id varchar, body varchar, n integer)")
    con.execute("insert into s.t values ('a', 'fine', 1), ('b', ?, 2)", [f"IBAN {IBAN}"])
    found = scan_duckdb_table(con, "s.t", id_column="id")
    assert [(f.table, f.column, f.row, f.entity) for f in found] == [("s.t", "body", "b", "IBAN_CODE")]


def _mlflow_store(root: Path, secret: str | None) -> None:
    """A real MLflow tracking store (SQLite) and artifact store, a run with a param and an artifact."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    exp = client.create_experiment("x", artifact_location=(root / "mlflow" / "artifacts").as_uri())
    run = client.create_run(exp)
    client.log_param(run.info.run_id, "note", f"contact {secret}" if secret else "no contact")
    art = root / "a.txt"
    art.write_text("ok\n" + (f"phone {secret}\n" if secret else ""))
    client.log_artifact(run.info.run_id, str(art), "report")
    art.unlink()
    client.set_terminated(run.info.run_id)


def _stores(root: Path, secret: str | None) -> None:
    """One of every kind of store genops keeps, holding ``secret`` (or not)."""
    text = f"call {secret}" if secret else "nothing personal"
    (root / "endpoint").mkdir(parents=True)
    (root / "endpoint" / "requests.jsonl").write_text(json.dumps({"input": text}) + "\n")
    (root / "notes.md").write_text(f"# notes\n\n{text}\n")
    db = sqlite3.connect(root / "ratings.sqlite")
    db.execute("create table ratings (id text, correction_json text)")
    db.execute("insert into ratings values ('r1', ?)", (json.dumps({"summary": text}),))
    db.commit()
    db.close()
    con = duckdb.connect(str(root / "warehouse.duckdb"))
    con.execute("create table requests (request_id varchar, input_text varchar)")
    con.execute("insert into requests values ('q1', ?)", [text])
    con.close()
    (root / "dagster" / "storage").mkdir(parents=True)
    (root / "dagster" / "storage" / "rating_queue").write_bytes(pickle.dumps({"items": [text]}))
    (root / "models").mkdir()
    (root / "models" / "model.safetensors").write_bytes(b"\x00" * 64)
    _mlflow_store(root, secret)


def test_home_scan_finds_pii_in_every_kind_of_store(tmp_path):
    dirty, clean = tmp_path / "dirty", tmp_path / "clean"
    _stores(dirty, "+1 212-555-0142")
    _stores(clean, None)
    report = scan_home(dirty)
    where = {(f.location, f.table) for f in report.findings if f.entity == "PHONE_NUMBER"}
    assert {("endpoint/requests.jsonl", None), ("notes.md", None), ("ratings.sqlite", "ratings"),
            ("warehouse.duckdb", "main.requests"), ("dagster/storage/rating_queue", None),
            ("mlflow/mlflow.db", "params")} <= where, where
    assert any(loc.startswith("mlflow/artifacts/") and loc.endswith("report/a.txt") for loc, _ in where), where
    assert report.skipped == ["models/model.safetensors (model weights)"]
    assert "555-0142" not in report.summary()

    ok = scan_home(clean)
    assert ok.clean, ok.summary()
    assert ok.files >= 7 and ok.tables >= 3


def test_gx_no_pii_validation_both_sides():
    pairs = pd.DataFrame({"pair_id": ["p1", "p2"], "input_text": ["where is my order", "refund please"],
                          "chosen_json": ['{"summary": "ok"}', json.dumps({"summary": f"mail {EMAIL}"})],
                          "rejected_json": ['{"summary": "no"}', '{"summary": "no"}']})
    report, findings = validate_no_pii("preference_pairs", pairs, id_column="pair_id",
                                       columns=("input_text", "chosen_json", "rejected_json"))
    assert not report.success
    [outcome] = [o for o in report.outcomes if not o.success]
    assert outcome.failing_rows == ["p2"] and outcome.details["unexpected_values"] == ["chosen_json:EMAIL_ADDRESS"]
    assert [(f.row, f.column, f.entity) for f in findings] == [("p2", "chosen_json", "EMAIL_ADDRESS")]
    report, findings = validate_no_pii("preference_pairs", pairs.iloc[:1], id_column="pair_id",
                                       columns=("input_text", "chosen_json", "rejected_json"))
    assert report.success and findings == []


def test_shipped_task_data_holds_no_pii():
    from genops_assets.lib.tasks import load_task, read_raw_file

    for folder in ("support_triage", "product_qa"):
        spec = load_task(REPO / "tasks", folder)
        rows = [{"id": f"{Path(ex.source_file).name}:{ex.source_row}", "input_text": ex.input_text,
                 "output_json": json.dumps(ex.output)} for p in spec.raw_files() for ex in read_raw_file(p, spec)]
        found = scan_frame(pd.DataFrame(rows), table=folder, id_column="id")
        assert found == [], [f.describe() for f in found]


@pytest.mark.graph
def test_a_mart_row_with_pii_blocks_tuning_and_is_named(tmp_path, tiny_model_dir):
    from graph_support import TASK, check_results, free_port, make_defs, materialized, select, tiny_run_config

    tasks_dir = tmp_path / "tasks"
    shutil.copytree(REPO / "tasks" / TASK, tasks_dir / TASK, ignore=shutil.ignore_patterns("incoming"))
    (tasks_dir / TASK / "incoming").mkdir()
    (tasks_dir / TASK / "incoming" / "pii.jsonl").write_text(json.dumps({
        "message": f"My card {CARD} was charged twice for the camera plan this month",
        "category": "billing", "priority": "high", "product": "cloud_plan",
        "summary": "Customer was charged twice for the camera cloud plan."}) + "\n")
    defs = make_defs(tmp_path / "home", free_port(), tasks_dir)
    selection = (select("raw_task_examples", "stg_task_examples", "golden_eval_dataset", "sft_dataset",
                        "few_shot_examples", "base_model", "tuned_adapter"))
    job = dg.define_asset_job("pii_probe", selection=selection)
    job_def = dg.Definitions.merge(defs, dg.Definitions(jobs=[job])).resolve_job_def("pii_probe")
    ops = {k: v for k, v in tiny_run_config(tiny_model_dir)["ops"].items() if job_def.graph.has_node_named(k)}
    result = job_def.execute_in_process(run_config={"ops": ops}, instance=dg.DagsterInstance.ephemeral(),
                                        raise_on_error=False)
    checks = check_results(result)
    assert "tuned_adapter" not in materialized(result)
    failed = [name for name, passed in checks.items() if name.startswith("no_pii_") and not passed]
    assert len(failed) == 1, checks  # the row lands in one mart (golden or SFT)
    [evaluation] = [e.event_specific_data for e in result.all_events
                    if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
                    and e.event_specific_data.check_name == failed[0]]
    assert evaluation.severity == dg.AssetCheckSeverity.ERROR
    [finding] = evaluation.metadata["pii_findings"].value
    assert finding["column"] == "input_text" and finding["entity"] == "CREDIT_CARD"
    assert finding["table"] == failed[0].removeprefix("no_pii_") and finding["row"]
    assert CARD not in json.dumps({k: str(v) for k, v in evaluation.metadata.items()}) + evaluation.description
    # The shipped data alone: every PII check passes.
    assert all(passed for name, passed in checks.items() if name.startswith("no_pii_") and name not in failed)


def test_machine_numbers_and_local_addresses_are_not_pii():
    df = pd.DataFrame({"v": [
        '{"loss": 0.4111111111111111, "ts": 1764690350.1234567}',      # floats: no card, no phone
        '{"latency_s": 1.1698, "queue_s": 0.1135, "id": "ex_4997605063013883"}',
        "sha256 4111111111111111aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "served at http://127.0.0.1:18400/v1 and http://0.0.0.0:8008",  # the endpoint's own URLs
        "client 8.8.8.8 called", f"card {CARD}", "call 212.555.0142 today",
    ]})
    assert [(f.row, f.entity) for f in scan_frame(df, table="t")] == [(4, "IP_ADDRESS"), (5, "CREDIT_CARD"),
                                                                     (6, "PHONE_NUMBER")]
