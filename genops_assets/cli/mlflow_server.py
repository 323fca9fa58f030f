"""`make mlflow-server`: an MLflow tracking server for genops, in the foreground.

Several Dagster steps writing to one store at once (multiprocess executor, sensors starting runs
side by side, Kubernetes pods) go through this server instead of opening the store file each:
the server owns the database (SQLite by default, Postgres given a URI) and proxies artifacts to
its artifact destination. Point genops at it with the two lines it prints:

    GENOPS_MLFLOW_TRACKING_URI=http://127.0.0.1:5001
    GENOPS_MLFLOW_ARTIFACT_ROOT=mlflow-artifacts:/genops

By default it serves the embedded store of the data directory (``<home>/mlflow/mlflow.db`` and
its artifacts), so switching keeps the history. ``--auth`` runs MLflow's basic-auth app: its user
store beside the backend (or MLFLOW_AUTH_CONFIG_PATH's), the admin password taken once from
MLFLOW_AUTH_ADMIN_PASSWORD; clients log in with MLFLOW_TRACKING_USERNAME / _PASSWORD.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_PORT = 5001
DEFAULT_WORKERS = 2
ARTIFACT_ROOT = "mlflow-artifacts:/genops"
# The SQLAlchemy driver each backend scheme needs (MLflow's server image ships the same ones).
DRIVERS = {"sqlite": "sqlite3", "postgresql": "psycopg2", "postgresql+psycopg2": "psycopg2",
           "postgresql+psycopg": "psycopg", "mysql": "MySQLdb", "mysql+pymysql": "pymysql"}
DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]", "MySQLdb": "mysqlclient",
                   "pymysql": "PyMySQL"}


class ServerConfigError(ValueError):
    """The server cannot start with these settings; the message names the setting."""


@dataclass(frozen=True)
class ServerPlan:
    argv: list[str]
    env: dict[str, str]  # set on top of the caller's environment
    backend: str  # passed in the environment, so a password in it stays off the command line
    tracking_uri: str  # what genops sets as GENOPS_MLFLOW_TRACKING_URI
    artifact_root: str  # ... and as GENOPS_MLFLOW_ARTIFACT_ROOT


def redact(uri: str) -> str:
    """``uri`` with its password replaced, for messages and logs."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return uri.replace(f":{parts.password}@", ":***@", 1)


def check_backend(uri: str) -> str:
    """The backend store URI, checked: a database URL whose driver is installed."""
    scheme = uri.split(":", 1)[0] if "://" in uri else ""
    if scheme not in DRIVERS:
        raise ServerConfigError(f"--backend-store-uri {redact(uri)!r}: expected a database URL "
                                f"({', '.join(f'{s}://' for s in DRIVERS)}); a server needs a database, not a folder")
    driver = DRIVERS[scheme]
    if importlib.util.find_spec(driver) is None:
        raise ServerConfigError(f"--backend-store-uri {redact(uri)!r} needs the {driver} driver, which is not "
                                f"installed: pip install {DRIVER_PACKAGES.get(driver, driver)}")
    if scheme == "sqlite":
        path = uri.removeprefix("sqlite:///").split("?", 1)[0]
        if not path or path == ":memory:":
            raise ServerConfigError(f"--backend-store-uri {uri!r}: a server's SQLite store must be a file")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    return uri


def auth_config(folder: Path, env: dict[str, str]) -> Path:
    """The basic-auth app's config: MLFLOW_AUTH_CONFIG_PATH when set, else one written into
    ``folder`` (user store ``folder/basic_auth.db``, nothing readable without a login)."""
    given = env.get("MLFLOW_AUTH_CONFIG_PATH")
    if given:
        if not Path(given).is_file():
            raise ServerConfigError(f"MLFLOW_AUTH_CONFIG_PATH={given!r} is not a file")
        return Path(given)
    folder.mkdir(parents=True, exist_ok=True)
    user_store = folder / "basic_auth.db"
    if not user_store.exists() and not env.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
        raise ServerConfigError(f"--auth on a new user store ({user_store}) needs MLFLOW_AUTH_ADMIN_PASSWORD "
                                "(the admin's password, used once to create the admin user)")
    path = folder / "basic_auth.ini"
    path.write_text("[mlflow]\n"
                    "default_permission = NO_PERMISSIONS\n"
                    f"database_uri = sqlite:///{user_store}\n"
                    "admin_username = admin\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                    # Each worker checks a password (PBKDF2) once a minute instead of per request:
                    # many writers log many small batches. A changed password is seen within 60 s.
                    "auth_cache_ttl_seconds = 60\n", encoding="utf-8")
    return path


def plan(home: Path, *, backend_store_uri: str | None = None, artifacts_destination: str | None = None,
         host: str = "127.0.0.1", port: int = DEFAULT_PORT, workers: int = DEFAULT_WORKERS, auth: bool = False,
         allowed_hosts: str | None = None, env: dict[str, str] | None = None) -> ServerPlan:
    """The ``mlflow server`` command for ``home``'s store (or the given one) and what genops sets
    to use it."""
    env = dict(os.environ if env is None else env)
    if workers < 1:
        raise ServerConfigError(f"--workers {workers}: at least 1")
    backend = check_backend(backend_store_uri or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    destination = artifacts_destination or str(home / "mlflow" / "artifacts")
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    argv = [str(mlflow_cli), "server", "--serve-artifacts", "--artifacts-destination", destination,
            "--host", host, "--port", str(port), "--workers", str(workers)]
    if allowed_hosts:
        argv += ["--allowed-hosts", allowed_hosts]
    extra = {"MLFLOW_BACKEND_STORE_URI": backend}
    if auth:
        extra["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config(home / "mlflow-server", env))
        # CSRF secret: the same for every worker process, which inherit this environment.
        if not env.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
            extra["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(32)
        argv += ["--app-name", "basic-auth"]
    client_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return ServerPlan(argv, extra, backend, f"http://{client_host}:{port}", ARTIFACT_ROOT)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genops-mlflow-server", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend-store-uri", default=os.environ.get("GENOPS_MLFLOW_SERVER_BACKEND_URI") or None,
                   help="sqlite:///... or postgresql://user@host/db (default: <home>/mlflow/mlflow.db)")
    p.add_argument("--artifacts-destination", default=os.environ.get("GENOPS_MLFLOW_SERVER_ARTIFACTS") or None,
                   help="where proxied artifacts go: a folder, gs://..., s3://... (default: <home>/mlflow/artifacts)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    p.add_argument("--auth", action="store_true", help="MLflow's basic-auth app (--app-name basic-auth)")
    p.add_argument("--allowed-hosts", default=None, help="Host headers served (DNS-rebinding protection)")
    return p


def main(argv: list[str] | None = None) -> int:
    from genops_assets.cli.home import init_home
    from resources import QUIET_ENV, SAFE_ENV

    args = parser().parse_args(argv)
    home = init_home()
    try:
        server = plan(home, backend_store_uri=args.backend_store_uri, artifacts_destination=args.artifacts_destination,
                      host=args.host, port=args.port, workers=args.workers, auth=args.auth,
                      allowed_hosts=args.allowed_hosts)
    except ServerConfigError as exc:
        print(f"genops mlflow-server: {exc}", file=sys.stderr)
        return 2
    print(f"MLflow tracking server on {server.tracking_uri} (store {redact(server.backend)}); point genops at it:\n"
          f"  export GENOPS_MLFLOW_TRACKING_URI={server.tracking_uri}"
          f" GENOPS_MLFLOW_ARTIFACT_ROOT={server.artifact_root}", flush=True)
    env = {**QUIET_ENV, **os.environ, **SAFE_ENV, **server.env}
    os.execve(server.argv[0], server.argv, env)  # the server gets the signals (Ctrl-C, SIGTERM)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
