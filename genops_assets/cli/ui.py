"""`genops ui`: the Dagster UI and the MLflow UI on localhost, until Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import time

from genops_assets.cli.home import REPO, bin_path, init_home

DAGSTER_UI = "http://127.0.0.1:3000"
MLFLOW_UI = "http://127.0.0.1:5000"


def ui() -> int:
    root = init_home()
    mlflow_db = root / "mlflow" / "mlflow.db"
    procs = [
        # workspace.yaml names the code location `genops` (with -m the UI would show the module path).
        subprocess.Popen([bin_path("dagster"), "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1",
                          "-p", "3000"], cwd=REPO),
        subprocess.Popen([bin_path("mlflow"), "ui", "--backend-store-uri", f"sqlite:///{mlflow_db}",
                          "--default-artifact-root", (root / "mlflow" / "artifacts").as_uri(),
                          "--host", "127.0.0.1", "--port", "5000"], cwd=root),
    ]
    print(f"Dagster UI: {DAGSTER_UI}   MLflow UI: {MLFLOW_UI}   (Ctrl-C stops both)", flush=True)
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0
