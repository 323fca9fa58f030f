"""Golden proposals a person accepts: `genops golden accept` writes the task's golden additions,
which the task's data then includes and dbt staging always puts in the golden set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pytest

from genops_assets.cli.main import main
from genops_assets.lib.golden_additions import ProposalError, accept
from genops_assets.lib.tasks import GOLDEN_ADDITIONS, load_task, read_raw_file

REPO = Path(__file__).resolve().parents[1]
OUTPUT = {"category": "shipping", "priority": "medium", "product": "none",
          "summary": "Customer reports a parcel two weeks late."}
PROPOSAL = {"proposal_id": "gp_1", "item_id": "it_1", "request_id": "q1", "n_raters": 2, "n_ratings": 2,
            "agreement": 1.0, "last_rated_at": "2026-01-01T00:00:00+00:00",
            "input_text": "where is my parcel, it is two weeks late", "output_json": json.dumps(OUTPUT)}


@pytest.fixture()
def tasks_dir(tmp_path) -> Path:
    shutil.copytree(REPO / "tasks" / "support_triage", tmp_path / "tasks" / "support_triage",
                    ignore=shutil.ignore_patterns("incoming"))
    return tmp_path / "tasks"


def test_accept_appends_once_and_the_task_reads_it(tasks_dir):
    spec = load_task(tasks_dir, "support_triage")
    path, added = accept(spec, PROPOSAL)
    assert added and path == spec.root / GOLDEN_ADDITIONS
    assert accept(spec, {**PROPOSAL, "proposal_id": "gp_2"}) == (path, False)  # same input: not twice
    spec = load_task(tasks_dir, "support_triage")
    assert path in spec.raw_files()
    (row,) = list(read_raw_file(path, spec))
    assert row.input_text == PROPOSAL["input_text"] and row.output == OUTPUT


def test_an_invalid_output_is_refused(tasks_dir):
    spec = load_task(tasks_dir, "support_triage")
    with pytest.raises(ProposalError, match=r"gp_1.*not valid"):
        accept(spec, {**PROPOSAL, "output_json": json.dumps({**OUTPUT, "category": "weather"})})
    assert not (spec.root / GOLDEN_ADDITIONS).exists()


def test_cli_accepts_a_proposal_from_the_mart(tasks_dir, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    with duckdb.connect(str(home / "warehouse.duckdb")) as con:
        con.execute("create schema marts_support_triage")
        con.execute("create table marts_support_triage.golden_proposals as select * from "
                    "(values (?, ?, ?, ?, ?, ?, ?, ?, ?)) t(proposal_id, item_id, request_id, input_text, "
                    "output_json, n_raters, n_ratings, agreement, last_rated_at)",
                    [PROPOSAL[k] for k in ("proposal_id", "item_id", "request_id", "input_text", "output_json",
                                           "n_raters", "n_ratings", "agreement", "last_rated_at")])
    monkeypatch.setenv("GENOPS_HOME", str(home))
    monkeypatch.setenv("GENOPS_TASKS_DIR", str(tasks_dir))
    assert main(["golden", "list", "--task", "support_triage"]) == 0
    assert "gp_1" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no golden proposal 'gp_9'"):
        main(["golden", "accept", "--task", "support_triage", "gp_9"])
    assert main(["golden", "accept", "--task", "support_triage", "gp_1"]) == 0
    assert "added to" in capsys.readouterr().out
    rows = (tasks_dir / "support_triage" / GOLDEN_ADDITIONS).read_text().splitlines()
    assert json.loads(rows[0])["message"] == PROPOSAL["input_text"]
