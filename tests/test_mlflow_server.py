"""Parallel MLflow writers, as several Dagster steps at once are: real processes, each creating runs
with params, metric histories and artifacts and registering model versions in one registered model,
against `make mlflow-server` (genops_assets/cli/mlflow_server.py, with its basic-auth app) and
against the embedded SQLite store. Every writer must finish, no write may be lost, and no
"database is locked" (or schema race) may surface."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from graph_support import free_port, http_server, http_status

from genops_assets.cli.mlflow_server import ARTIFACT_ROOT, ServerConfigError, main, plan
from resources.tracking import MlflowTracking

pytestmark = pytest.mark.server

WRITERS = 8
RUNS = 3
WRITER = Path(__file__).with_name("mlflow_writer.py")
REPO = Path(__file__).resolve().parents[1]
PASSWORD = "pw-parallel-writers"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`genops_assets.cli.mlflow_server --auth` on a free port over a fresh data directory (its
    default store: <home>/mlflow/mlflow.db); yields (url, home)."""
    home = tmp_path_factory.mktemp("mlflow-server-home")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "GENOPS_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD}
    env.pop("MLFLOW_AUTH_CONFIG_PATH", None)
    log_path = home / "server.log"
    cmd = [sys.executable, "-m", "genops_assets.cli.mlflow_server", "--port", str(port), "--workers", "2", "--auth",
           "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"]
    url = f"http://127.0.0.1:{port}"
    with http_server(cmd, f"{url}/health", log_path, 180, env=env, cwd=REPO):
        yield url, home
    assert "database is locked" not in log_path.read_text(errors="replace")


def run_writers(uri: str, artifact_root: str, folder: Path, env: dict[str, str] | None = None) -> list[dict]:
    """WRITERS writer processes started together; each must exit 0 without "database is locked"."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    procs = []
    for w in range(WRITERS):
        err = open(folder / f"writer-{w}.log", "wb")  # noqa: SIM115 - closed below
        procs.append((w, err, subprocess.Popen(
            [sys.executable, str(WRITER), uri, artifact_root, str(w), str(RUNS), str(folder / f"writer-{w}.json")],
            stdout=err, stderr=subprocess.STDOUT, env=env, cwd=REPO)))
    failures = []
    for w, err, proc in procs:
        rc = proc.wait(timeout=900)
        err.close()
        text = (folder / f"writer-{w}.log").read_text(errors="replace")
        if rc != 0 or "database is locked" in text:
            failures.append(f"writer {w} (exit {rc}):\n{text[-2500:]}")
    assert not failures, "\n".join(failures)
    return [r for w in range(WRITERS) for r in json.loads((folder / f"writer-{w}.json").read_text())]


def assert_nothing_lost(tracking: MlflowTracking, made: list[dict]) -> None:
    client = tracking.client()
    assert len(made) == WRITERS * RUNS
    runs = client.search_runs([client.get_experiment_by_name("genops/concurrency").experiment_id],
                              max_results=1000)
    assert {r.info.run_id for r in runs} == {m["run_id"] for m in made}
    assert {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        worker, index = run.data.tags["genops.worker"], run.data.tags["genops.index"]
        assert run.data.params == {"worker": worker, "index": index, "rank": "4", "lr": "0.0002"}
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
        assert [a.path for a in client.list_artifacts(run.info.run_id, "notes")] == [
            f"notes/note-{worker}-{index}.txt"]
    # One registered model, one version per run, numbered without gaps or duplicates.
    versions = client.search_model_versions("name = 'genops-concurrency'", max_results=1000)
    assert sorted(int(v.version) for v in versions) == list(range(1, WRITERS * RUNS + 1))
    by_version = {str(v.version): v for v in versions}
    for m in made:
        v = by_version[str(m["version"])]
        assert v.run_id == m["run_id"] and v.tags["genops.checked"] == "yes"
        assert v.tags["genops.version_key"] == f"{m['worker']}-{m['index']}"
    for w in range(WRITERS):
        last = max((m for m in made if m["worker"] == w), key=lambda m: m["index"])
        assert tracking.alias("genops-concurrency", f"w{w}").version == str(last["version"])


def test_the_server_requires_a_login_and_serves_the_data_directory_store(server):
    url, home = server
    search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(search) == 401
    assert http_status(search, "admin", PASSWORD) == 200
    assert (home / "mlflow" / "mlflow.db").is_file()  # the embedded store's file, now the server's


def test_parallel_writers_through_the_server(server, tmp_path, monkeypatch):
    url, home = server
    credentials = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    made = run_writers(url, ARTIFACT_ROOT, tmp_path / "writers", credentials)
    for k, v in credentials.items():
        monkeypatch.setenv(k, v)
    assert_nothing_lost(MlflowTracking(tracking_uri=url, artifact_root=ARTIFACT_ROOT), made)
    # Artifacts went through the server to its destination, not to a path the clients chose.
    stored = sorted(p.name for p in (home / "mlflow" / "artifacts").rglob("note-*.txt"))
    assert stored == sorted(f"note-{m['worker']}-{m['index']}.txt" for m in made)


def test_parallel_writers_on_a_new_embedded_sqlite_store(tmp_path):
    """The embedded store, new: the writers also race to create MLflow's tables, the experiment
    and the registered model (resources/tracking.py serializes the first and tolerates the others)."""
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    root = (tmp_path / "artifacts").as_uri()
    made = run_writers(uri, root, tmp_path / "writers")
    assert_nothing_lost(MlflowTracking(tracking_uri=uri, artifact_root=root), made)


def test_backend_and_auth_settings_are_checked_before_starting(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    with pytest.raises(ServerConfigError, match="expected a database URL"):
        plan(home, backend_store_uri=str(tmp_path / "mlruns"), env={})
    with pytest.raises(ServerConfigError, match="must be a file"):
        plan(home, backend_store_uri="sqlite:///:memory:", env={})
    with pytest.raises(ServerConfigError, match="MLFLOW_AUTH_ADMIN_PASSWORD"):
        plan(home, auth=True, env={})

    postgres = "postgresql://genops:s3cret@db.internal:5432/mlflow"
    if find_spec("psycopg2") is None:
        with pytest.raises(ServerConfigError, match="psycopg2") as caught:
            plan(home, backend_store_uri=postgres, env={})
        assert "s3cret" not in str(caught.value) and "genops:***@db.internal" in str(caught.value)
    else:
        server = plan(home, backend_store_uri=postgres, env={})
        assert server.env["MLFLOW_BACKEND_STORE_URI"] == postgres and postgres not in " ".join(server.argv)

    server = plan(home, auth=True, host="0.0.0.0", port=19610, env={"MLFLOW_AUTH_ADMIN_PASSWORD": "x"})
    assert server.argv[-2:] == ["--app-name", "basic-auth"] and "--serve-artifacts" in server.argv
    assert server.env["MLFLOW_BACKEND_STORE_URI"] == f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    assert (server.tracking_uri, server.artifact_root) == ("http://127.0.0.1:19610", "mlflow-artifacts:/genops")
    ini = Path(server.env["MLFLOW_AUTH_CONFIG_PATH"]).read_text()
    assert "default_permission = NO_PERMISSIONS" in ini and str(home / "mlflow-server" / "basic_auth.db") in ini

    monkeypatch.setenv("GENOPS_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    assert main(["--backend-store-uri", "mongodb://x/y"]) == 2
    assert "--backend-store-uri 'mongodb://x/y': expected a database URL" in capsys.readouterr().err
