"""One of several MLflow writers started at once by tests/test_mlflow_server.py: what a tuning or
evaluation step writes, through genops' tracking resource, against one store.

Usage: python mlflow_writer.py TRACKING_URI ARTIFACT_ROOT WORKER RUNS OUT_JSON

Every writer uses the same experiment and registered model (the first writes create them, the
others must find them), so the writers race on creation as well as on inserts. Each run logs
params, a metric history, an artifact and a registered model version with tags and an alias.
OUT_JSON gets the run ids and model versions this writer made; any failure exits non-zero with
the traceback on stderr.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from resources.tracking import MlflowTracking

EXPERIMENT = "genops/concurrency"
MODEL = "genops-concurrency"


def main(uri: str, artifact_root: str, worker: int, runs: int, out: Path) -> None:
    tracking = MlflowTracking(tracking_uri=uri, artifact_root=artifact_root)
    made = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            tags = {"genops.task": "concurrency", "genops.worker": str(worker), "genops.index": str(i)}
            with tracking.run(EXPERIMENT, f"w{worker}-r{i}", tags) as run_id:
                tracking.log_params(run_id, {"worker": worker, "index": i, "rank": 4, "lr": 2e-4})
                for step in range(1, 6):
                    tracking.log_metrics(run_id, {"loss": 1.0 / step, "tokens_per_s": 100.0 * step}, step=step)
                note = Path(tmp) / f"note-{worker}-{i}.txt"
                note.write_text(f"worker {worker} run {i}\n")
                tracking.log_artifact(run_id, note, "notes")
                mv = tracking.register(MODEL, tracking.artifact_uri(run_id, "notes"), run_id,
                                       {**tags, "genops.version_key": f"{worker}-{i}"})
                tracking.set_alias(MODEL, f"w{worker}", mv.version)
                tracking.set_version_tags(MODEL, mv.version, {"genops.checked": "yes"})
            made.append({"run_id": run_id, "version": mv.version, "worker": worker, "index": i})
    out.write_text(json.dumps(made))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
