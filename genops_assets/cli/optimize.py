"""`genops optimize`: a task's optimization job (its variants, the table that judges them against
the tuned original, the configured deploy) with progress lines, then the table.

Run the loop first (`make demo`): the tuned adapter, its evaluation and the base model are the
job's inputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from genops_assets.cli.home import demo_task, init_home, task_job, write_task_run_config


def record_bench(results: Path, task: str, bench_file: Path) -> Path:
    """The variants' serving numbers beside `make bench`'s others: ``results.json`` gains (or
    replaces) ``variants.<task>``, the rest of the file kept."""
    from genops_assets.lib.hashing import atomic_write_json

    data = json.loads(results.read_text(encoding="utf-8")) if results.is_file() else {}
    data.setdefault("variants", {})[task] = json.loads(bench_file.read_text(encoding="utf-8"))
    results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(results, data)
    return results


def unmaterialized(task: str) -> list[str]:
    """The job's inputs from the loop that the Dagster instance has never materialized."""
    import dagster as dg

    instance = dg.DagsterInstance.get()
    keys = [dg.AssetKey("base_model"), dg.AssetKey([task, "tuned_adapter"]), dg.AssetKey([task, "eval_report"])]
    return [k.to_user_string() for k in keys if instance.get_latest_materialization_event(k) is None]


def optimize(task: str | None = None, run_config: str | None = None, out=sys.stdout) -> int:
    from genops_assets.cli.demo import run_job
    from genops_assets.cli.progress import duration

    root = init_home()
    task_ref = demo_task(task)
    job = task_job("optimization", task_ref.name)
    config = None
    if run_config:
        config = write_task_run_config(Path(run_config), task_ref.name, root / "logs" / f"{job}.run_config.yaml")
    missing = unmaterialized(task_ref.name)
    if missing:
        print(f"genops optimize: {', '.join(missing)} not materialized yet: run `make demo` (TASK={task_ref.name}) "
              "first; the tuned adapter, its evaluation and the base model are the job's inputs", file=sys.stderr)
        return 2
    print(f"genops optimize: job '{job}', data directory {root}", file=out, flush=True)
    run = run_job(job, root, config, out)
    report = run.materializations.get("optimization_report", {})
    if report.get("report_path"):
        report_dir = Path(report["report_path"]).parent
        print("\n" + (report_dir / "report.md").read_text(encoding="utf-8"), file=out)
        print(f"MLflow run: {report.get('mlflow_run_id')}", file=out)
        results = record_bench(root / "bench" / "results.json", task_ref.name, report_dir / "bench.json")
        print(f"serving numbers of the variants: {results} (\"variants\")", file=out)
    deployed = run.materializations.get("deployed_variant")
    if deployed is not None and "variant" in deployed:
        print(f"deployed: {deployed['variant']} v{deployed['version']} at {deployed['url']} "
              f"(engine {deployed.get('engine')})", file=out)
    elif deployed is not None:
        print(f"deployed: none (optimization.deploy in {task_ref.root / 'task.yaml'})", file=out)
    if run.returncode != 0:
        print(f"\ngenops optimize: job '{job}' FAILED after {duration(run.wall_s)} (exit {run.returncode})"
              + (f": {run.failure}" if run.failure else "") + f"\n  full log: {run.log_file}", file=sys.stderr)
        return run.returncode
    print(f"genops optimize: done in {duration(run.wall_s)}", file=out)
    return 0
