"""`genops` command line: prepare the data directory, run the demo loop, open the UIs."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DAGSTER_YAML = """\
# Written by `genops init-home`. Local Dagster instance of genops.
telemetry:
  enabled: false
"""


def home() -> Path:
    return Path(os.environ.get("GENOPS_HOME") or REPO / ".genops").resolve()


def init_home() -> Path:
    """Create the data directory and a Dagster home with telemetry off."""
    from resources import QUIET_ENV

    root = home()
    dagster_home = Path(os.environ.get("DAGSTER_HOME") or root / "dagster")
    dagster_home.mkdir(parents=True, exist_ok=True)
    for sub in ("mlflow", "models", "endpoint", "runs", "cache"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    cfg = dagster_home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    os.environ["GENOPS_HOME"] = str(root)
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    return root


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def demo(job: str = "genops_loop") -> int:
    root = init_home()
    started = time.monotonic()
    print(f"genops demo: running job '{job}' on the embedded defaults (data directory {root})", flush=True)
    rc = subprocess.call(
        [_bin("dagster"), "job", "execute", "-m", "genops_assets.definitions", "-j", job], cwd=REPO
    )
    wall = time.monotonic() - started
    if rc != 0:
        print(f"\ngenops demo: job '{job}' FAILED after {wall:.0f}s (exit {rc}); see the log above "
              f"or `make ui` -> Runs.", file=sys.stderr)
        return rc
    state_file = root / "endpoint" / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    url = f"http://{state.get('host', '127.0.0.1')}:{state.get('port', '?')}"
    _print_report(root)
    _ask_endpoint(f"{url}/v1")
    print(f"""
genops demo finished in {wall / 60:.1f} min.

  Endpoint (OpenAI-compatible, pid {state.get('pid', '?')}):  {url}/v1   models: base, champion
      curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{{"model": "champion", "messages": [{{"role": "user", "content": "My camera is offline"}}]}}'
  Dagster UI (runs, lineage, checks):    make ui  ->  http://127.0.0.1:3000
  MLflow UI (runs, registry, aliases):   make ui  ->  http://127.0.0.1:5000
  Evaluation report:                     {root}/runs/eval/<mlflow run id>/report.html
  Continuous training: drop JSONL/CSV files into tasks/<task>/incoming/ (sensor incoming_data_sensor).
  Stop the endpoint:                     make stop
""", flush=True)
    return 0


def _print_report(root: Path) -> None:
    """The metric table of the newest evaluation report."""
    reports = sorted((root / "runs" / "eval").glob("*/report.md"), key=lambda p: p.stat().st_mtime)
    if not reports:
        return
    lines = [ln for ln in reports[-1].read_text().splitlines() if ln.startswith("|") or "gate" in ln.lower()]
    print("\nEvaluation on the golden set (" + str(reports[-1].parent) + "):")
    print("\n".join("  " + ln for ln in lines[:40]))


def _ask_endpoint(base_url: str) -> None:
    """One request through the official openai client, as a user would send it."""
    from openai import OpenAI

    from genops_assets.lib.formatting import build_messages
    from genops_assets.lib.tasks import load_task

    message = "Hi, my thermostat shows 'offline' in the app since the power cut yesterday and the house is cold."
    try:
        task = load_task(os.environ.get("GENOPS_TASKS_DIR") or REPO / "tasks", os.environ.get("GENOPS_TASK") or "support_triage")
        client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="champion", temperature=0, max_tokens=task.max_new_tokens,
                                               messages=build_messages(task, message, []))
    except Exception as exc:  # noqa: BLE001 - reported, the demo itself already verified the endpoint
        print(f"\nendpoint request failed: {exc}", file=sys.stderr)
        return
    print(f"\nAsked the endpoint (model champion): {message}\n  -> {reply.choices[0].message.content}"
          f"\n  ({reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens)")


def ui() -> int:
    root = init_home()
    mlflow_db = root / "mlflow" / "mlflow.db"
    procs = [
        subprocess.Popen([_bin("dagster"), "dev", "-m", "genops_assets.definitions", "-h", "127.0.0.1", "-p", "3000"], cwd=REPO),
        subprocess.Popen([_bin("mlflow"), "ui", "--backend-store-uri", f"sqlite:///{mlflow_db}",
                          "--default-artifact-root", (root / "mlflow" / "artifacts").as_uri(),
                          "--host", "127.0.0.1", "--port", "5000"], cwd=root),
    ]
    print("Dagster UI: http://127.0.0.1:3000   MLflow UI: http://127.0.0.1:5000   (Ctrl-C stops both)", flush=True)
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


def stop() -> int:
    from genops_assets.lib.serving import control

    init_home()
    for name in ("endpoint", "judge"):
        if control.stop_server(home() / name):
            print(f"{name} server stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genops", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("init-home", help="create the data directory and Dagster home")
    d = sub.add_parser("demo", help="run the whole loop on the embedded defaults")
    d.add_argument("--job", default="genops_loop")
    sub.add_parser("ui", help="Dagster UI on :3000 and MLflow UI on :5000")
    sub.add_parser("stop", help="stop the local endpoint")
    args = parser.parse_args(argv)
    if args.cmd == "init-home":
        print(init_home())
        return 0
    if args.cmd == "demo":
        return demo(args.job)
    if args.cmd == "ui":
        return ui()
    return stop()


if __name__ == "__main__":
    sys.exit(main())
