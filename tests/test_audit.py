"""The audit log: append-only in SQLite, written by `genops rollback`, read by `genops audit`.
(Deploys and promotions are recorded by deployed_endpoint: tests/test_graph.py; the sensor's
rollbacks: tests/test_ct_sensors.py.)"""

from __future__ import annotations

import sqlite3

import pytest

from genops_assets.lib.audit import AuditLog, cli_actor, markdown_table
from resources.tracking import registered_model_name


def test_entries_are_append_only(tmp_path):
    log = AuditLog(tmp_path / "audit" / "audit.sqlite")
    first = log.record("promote", "genops-a", "2", "1", actor="dagster-run:r1", reason="gate passed", run_id="r1")
    log.record("deploy", "genops-a", "2", "1", actor="dagster-run:r1", reason="endpoint reloaded",
               details={"url": "http://x/v1"})
    log.record("rollback", "genops-b", "1", "2", actor="user:ana", reason="manual")
    db = sqlite3.connect(log.path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only: UPDATE refused"):
        db.execute("update audit_log set reason = 'nothing happened' where id = ?", (first,))
    with pytest.raises(sqlite3.DatabaseError, match="append-only: DELETE refused"):
        db.execute("delete from audit_log")
    db.close()
    entries = log.entries("genops-a")
    assert [(e["action"], e["version"], e["previous"]) for e in entries] == [("deploy", "2", "1"),
                                                                              ("promote", "2", "1")]
    assert entries[0]["details"] == {"url": "http://x/v1"} and entries[1]["reason"] == "gate passed"
    assert [e["model"] for e in log.entries(limit=2)] == ["genops-b", "genops-a"]
    table = markdown_table(log.entries())
    assert table.count("\n") == 4 and "| rollback | genops-b | 1 | 2 | user:ana | manual |" in table


def test_bad_entries_are_refused(tmp_path):
    log = AuditLog(tmp_path / "audit.sqlite")
    with pytest.raises(ValueError, match="'retire' is not one of"):
        log.record("retire", "m", "1", actor="x", reason="y")
    with pytest.raises(ValueError, match="needs a model, an actor and a reason"):
        log.record("deploy", "m", "1", actor="x", reason="")
    assert AuditLog(tmp_path / "none.sqlite").entries() == [] and markdown_table([]) == "_no audit entries_"


def test_cli_rollback_is_recorded_and_shown(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GENOPS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home" / "dagster"))
    from genops_assets.cli.main import main
    from resources import build_resources

    res = build_resources(home=tmp_path / "home")
    tracking, home = res["mlflow"], res["home"]
    name = registered_model_name("support_triage")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    for previous in ("", "1"):
        run_id = tracking.start_run("genops/support_triage", "sft", {})
        tracking.log_artifacts(run_id, adapter, "adapter")
        tracking.end_run(run_id)
        tracking.register(name, tracking.artifact_uri(run_id, "adapter"), run_id,
                          {"genops.previous_champion": previous})
    tracking.set_alias(name, "champion", "2")

    assert main(["rollback", "--task", "support_triage"]) == 0
    assert tracking.alias(name, "champion").version == "1"
    [entry] = AuditLog(home.audit_path).entries(name)
    assert entry["action"] == "rollback" and (entry["version"], entry["previous"]) == ("1", "2")
    assert entry["actor"] == cli_actor() and entry["reason"] == "manual (genops rollback)"
    # Nothing to roll back (v1 records no previous champion): refused, nothing recorded.
    assert main(["rollback", "--task", "support_triage"]) == 2
    assert len(AuditLog(home.audit_path).entries()) == 1

    capsys.readouterr()
    assert main(["audit", "--model", name]) == 0
    out = capsys.readouterr().out
    assert f"| rollback | {name} | 1 | 2 | {cli_actor()} | manual (genops rollback) |" in out
    assert main(["audit", "--model", "genops-nothing"]) == 0
    assert "_no audit entries_" in capsys.readouterr().out
