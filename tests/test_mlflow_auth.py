"""A shared MLflow server as the README describes it: MLflow's basic-auth app, the admin password
from the environment, allowed hosts set. Requests without credentials get 401, a request with a
Host header the server does not serve is refused, and genops' tracking resource, given the
credentials through MLflow's own environment variables, logs a run that ends FINISHED."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest
from graph_support import free_port, http_server, http_status

from resources.tracking import MlflowTracking

pytestmark = pytest.mark.server

ADMIN = "admin"
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


def auth_config(folder: Path) -> Path:
    """The auth app's config: its user store in ``folder``, nothing readable without a login."""
    path = folder / "basic_auth.ini"
    path.write_text("[mlflow]\n"
                    "default_permission = NO_PERMISSIONS\n"
                    f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
                    f"admin_username = {ADMIN}\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return path


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """``mlflow server --app-name basic-auth`` on a free port with a SQLite store in a temporary
    folder (started once for this module: about a minute on 2 cores); yields (url, admin
    password, folder)."""
    tmp_path = tmp_path_factory.mktemp("mlflow-auth")
    port, password = free_port(), f"pw-{uuid.uuid4().hex}"
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(auth_config(tmp_path)),
           "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex}
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_cli), "server", "--app-name", "basic-auth",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--artifacts-destination", str(tmp_path / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"]
    url = f"http://127.0.0.1:{port}"
    with http_server(cmd, f"{url}/health", tmp_path / "mlflow-server.log", 120, env=env):
        yield url, password, tmp_path


def test_unauthenticated_and_wrong_password_requests_get_401(auth_server):
    url, password, _ = auth_server
    assert http_status(url + SEARCH) == 401
    assert http_status(url + SEARCH, ADMIN, "not-the-password") == 401
    assert http_status(url + SEARCH, ADMIN, password) == 200


def test_a_host_the_server_does_not_serve_is_refused(auth_server):
    url, password, _ = auth_server
    port = url.rsplit(":", 1)[1]
    assert http_status(url + SEARCH, ADMIN, password, host=f"attacker.example:{port}") == 403
    assert http_status(url + SEARCH, ADMIN, password, host=f"localhost:{port}") == 200


def test_genops_tracking_logs_a_run_with_credentials_from_the_environment(auth_server, tmp_path, monkeypatch):
    url, password, server_dir = auth_server
    tracking = MlflowTracking(tracking_uri=url, artifact_root="mlflow-artifacts:/genops")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=r"401|Unauthorized|credentials"):
        tracking.experiment_id("genops/auth")

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    note = tmp_path / "note.txt"
    note.write_text("logged through the auth proxy\n")
    with tracking.run("genops/auth", "auth-check", {"genops.task": "auth"}) as run_id:
        tracking.log_params(run_id, {"rank": 4})
        tracking.log_metrics(run_id, {"loss": 0.5}, step=1)
        tracking.log_artifact(run_id, note)
    run = tracking.client().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"rank": "4"} and run.data.metrics == {"loss": 0.5}
    assert [a.path for a in tracking.client().list_artifacts(run_id)] == ["note.txt"]
    assert any((server_dir / "artifacts").rglob("note.txt"))  # stored by the server, not by the client
