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


def demo(job: str = "genops_loop", summary: bool = True) -> int:
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
    if not summary:
        return 0
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

    from genops_assets.lib.tasks import load_task

    message = "Hi, my thermostat shows 'offline' in the app since the power cut yesterday and the house is cold."
    try:
        task = load_task(os.environ.get("GENOPS_TASKS_DIR") or REPO / "tasks", os.environ.get("GENOPS_TASK") or "support_triage")
        from resources.endpoint import client_api_key

        client = OpenAI(base_url=base_url, api_key=client_api_key(), max_retries=0, timeout=120)
        # The server renders its deployed production prompt around the variables.
        reply = client.chat.completions.create(model="champion", temperature=0, messages=[],
                                               extra_body={"prompt_variables": {task.input_field: message}})
    except Exception as exc:  # noqa: BLE001 - reported, the demo itself already verified the endpoint
        print(f"\nendpoint request failed: {exc}", file=sys.stderr)
        return
    version = (reply.model_extra or {}).get("genops", {}).get("prompt_version")
    print(f"\nAsked the endpoint (model champion, prompt v{version}): {message}\n  -> {reply.choices[0].message.content}"
          f"\n  ({reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens)")


def _tracking():
    """The MLflow registry the assets use (same environment variables, same data directory)."""
    from resources import build_resources

    res = build_resources(home())
    return res["mlflow"], res["home"], res["task"]


def prompt_try(task_name: str | None, prompt_file: str, model: str, n: int, batch_size: int = 8,
               base_model: str | None = None) -> int:
    """Outputs and metrics of a prompt file on a sample of validation examples, in seconds."""
    import duckdb

    from genops_assets.defs.datasets.assets import MART_SCHEMA
    from genops_assets.lib.base_model import convert_gguf, find_embedded_gguf
    from genops_assets.lib.cache import CallCache
    from genops_assets.lib.evaluation import EvalExample, evaluate_model
    from genops_assets.lib.hashing import sha256_json
    from genops_assets.lib.prompts import PRODUCTION, load_prompt_file, prompt_registry_name
    from genops_assets.lib.tasks import load_task, read_raw_file

    root = init_home()
    mlflow, gh, task_res = _tracking()
    spec = load_task(task_res.tasks_dir, task_name or task_res.name)
    production = mlflow.prompt_alias(prompt_registry_name(spec.name), PRODUCTION, spec.input_field)
    base_template = production.template if production else spec.prompt
    template = load_prompt_file(prompt_file, base_template)

    examples: list[EvalExample] = []
    source = ""
    db = root / "warehouse.duckdb"
    if db.exists():
        try:
            with duckdb.connect(str(db), read_only=True) as con:
                rows = con.execute(f"select example_id, input_text, output_json from {MART_SCHEMA}.sft_dataset "
                                   "where split = 'validation' order by example_id limit ?", [n]).fetchall()
            examples = [EvalExample(i, t, json.loads(o)) for i, t, o in rows]
            source = f"validation split of {db}"
        except duckdb.Error:
            examples = []
    if not examples:  # no marts yet: the first rows of the task's raw files
        for path in spec.raw_files():
            for ex in read_raw_file(path, spec):
                examples.append(EvalExample(f"{ex.source_file}:{ex.source_row}", ex.input_text, ex.output))
                if len(examples) >= n:
                    break
            if len(examples) >= n:
                break
        source = "raw task files (run `make demo` to try on the validation split)"

    if base_model:
        from genops_assets.lib.base_model import resolve_local_folder

        info = resolve_local_folder(Path(base_model).expanduser().resolve())
    else:
        info = convert_gguf(find_embedded_gguf(), root / "models" / "base", log=lambda m: None)
    adapters, adapter, digest = {}, None, info.folder_digest
    if model != "base":
        from genops_assets.defs.evaluation.assets import fetch_registered_adapter
        from genops_assets.defs.tuning.assets import registered_model_name

        name = registered_model_name(spec.name)
        ref = mlflow.alias(name, model) if not model.isdigit() else mlflow.get_version(name, model)
        if ref is None:
            print(f"{name} has no alias or version '{model}'", file=sys.stderr)
            return 2
        adapters = {"adapter": str(fetch_registered_adapter(mlflow, gh, name, ref.version))}
        adapter = "adapter"
        digest = sha256_json([info.folder_digest, ref.tags.get("genops.adapter_digest", ref.version)])

    holder: dict = {}

    def load():
        if "m" not in holder:
            from genops_assets.lib.generation import load_model

            holder["m"] = load_model(info.path, adapters)
        return holder["m"]

    started = time.monotonic()
    ev = evaluate_model(load, adapter, "try", digest, spec, examples, [], CallCache(root / "cache" / "calls.sqlite"),
                        batch_size, log=lambda m: print("  " + m, flush=True), prompt=template)
    print(f"\nprompt {prompt_file} (digest {template.digest[:12]}) on {len(examples)} examples from {source}, "
          f"model {model}:\n")
    for p in ev.predictions:
        ok = "ok " if all(p["field_match"].values()) else "ERR"
        print(f"[{ok}] {p['example_id']}: {p['input'][:70]!r}\n      -> {p['prediction'][:140]!r}")
    print("\nmetrics:")
    for k, v in ev.metrics.items():
        print(f"  {k:28s} {v:.4f}" if isinstance(v, float) else f"  {k:28s} {v}")
    print(f"\n{ev.model_calls} model calls, {time.monotonic() - started:.1f}s")
    return 0


def prompt_admin(args) -> int:
    from genops_assets.lib.prompts import CANDIDATE, PRODUCTION, PromptError, prompt_registry_name
    from genops_assets.lib.tasks import load_task

    init_home()
    mlflow, _, task_res = _tracking()
    spec = load_task(task_res.tasks_dir, args.task or task_res.name)
    name = prompt_registry_name(spec.name)
    try:
        if args.prompt_cmd == "list":
            for ref in mlflow.prompt_versions(name, spec.input_field):
                print(f"v{ref.version:<3} {','.join(ref.aliases):22s} {ref.digest[:12]}  {ref.commit_message}")
        elif args.prompt_cmd == "alias":
            mlflow.set_prompt_alias(name, args.alias, args.version)
            print(f"{name}: {args.alias} -> v{args.version}")
        elif args.prompt_cmd == "promote":
            cand = mlflow.require_prompt_alias(name, CANDIDATE, spec.input_field)
            prev = mlflow.prompt_alias(name, PRODUCTION, spec.input_field)
            mlflow.set_prompt_alias(name, PRODUCTION, cand.version)
            if prev is not None:
                mlflow.set_prompt_alias(name, "previous_production", prev.version)
            print(f"{name}: production -> v{cand.version} (was v{prev.version if prev else 'unset'})")
        elif args.prompt_cmd == "rollback":
            prev = mlflow.require_prompt_alias(name, "previous_production", spec.input_field)
            cur = mlflow.require_prompt_alias(name, PRODUCTION, spec.input_field)
            mlflow.set_prompt_alias(name, PRODUCTION, prev.version)
            mlflow.set_prompt_alias(name, "previous_production", cur.version)
            print(f"{name}: production -> v{prev.version} (was v{cur.version})")
    except PromptError as exc:
        print(f"genops prompt: {exc}", file=sys.stderr)
        return 2
    return 0


def serve(host: str, port: int) -> int:
    """The server in the foreground (containers): the embedded model converted once, or
    GENOPS_BASE_MODEL; adapters from GENOPS_ADAPTERS as name=folder,..."""
    import secrets

    from genops_assets.lib.base_model import convert_gguf, find_embedded_gguf
    from genops_assets.lib.hashing import atomic_write_text
    from genops_assets.lib.serving import control, server

    root = init_home()
    base = os.environ.get("GENOPS_BASE_MODEL") or convert_gguf(find_embedded_gguf(), root / "models" / "base").path
    state_dir = root / "endpoint"
    state_dir.mkdir(parents=True, exist_ok=True)
    token = state_dir / control.TOKEN_FILE
    atomic_write_text(token, secrets.token_urlsafe(32))
    os.chmod(token, 0o600)
    argv = ["--base-model", str(base), "--state-dir", str(state_dir), "--host", host, "--port", str(port)]
    for item in filter(None, (os.environ.get("GENOPS_ADAPTERS") or "").split(",")):
        argv += ["--adapter", item.strip()]
    server.main(argv)
    return 0


def model_rollback(task_name: str | None, version: str | None) -> int:
    """Move `champion` back (to ``version``, or the previous champion recorded at promotion);
    a server following the registry hot-swaps it."""
    from genops_assets.defs.tuning.assets import registered_model_name

    init_home()
    mlflow, _, task_res = _tracking()
    name = registered_model_name(task_name or task_res.name)
    current = mlflow.alias(name, "champion")
    if current is None:
        print(f"{name} has no champion", file=sys.stderr)
        return 2
    target = version or current.tags.get("genops.previous_champion")
    if not target:
        print(f"{name} v{current.version} records no previous champion; name a version", file=sys.stderr)
        return 2
    mlflow.get_version(name, target)  # a clear error for a version that does not exist
    mlflow.set_alias(name, "champion", target)
    print(f"{name}: champion -> v{target} (was v{current.version}); the endpoint follows within seconds")
    return 0


def enhance() -> int:
    """Prompt enhancement, then the eval report again (cached) with the prompt comparison."""
    rc = demo("prompt_enhancement", summary=False)
    if rc == 0:
        rc = subprocess.call([_bin("dagster"), "asset", "materialize", "-m", "genops_assets.definitions",
                              "--select", "eval_report"], cwd=REPO)
        _print_report(home())
    return rc


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
    sv = sub.add_parser("serve", help="the OpenAI-compatible server in the foreground (containers)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8008)
    rb = sub.add_parser("rollback", help="move the champion alias back (the endpoint follows)")
    rb.add_argument("--task", default=None)
    rb.add_argument("--version", default=None, help="default: the previous champion")
    sub.add_parser("enhance", help="LLM prompt enhancement, then the eval report with the prompt comparison")
    pr = sub.add_parser("prompt", help="prompt registry: try, list, alias, promote, rollback")
    psub = pr.add_subparsers(dest="prompt_cmd", required=True)
    t = psub.add_parser("try", help="outputs and metrics of a prompt file on a validation sample")
    t.add_argument("--task", default=None)
    t.add_argument("--prompt", required=True, help="a .txt (system instructions) or .yaml (system/user/generation)")
    t.add_argument("--model", default="base", help="base, an alias (champion, challenger) or a version number")
    t.add_argument("-n", type=int, default=20)
    t.add_argument("--base-model", default=None, help="a local Hugging Face folder instead of the embedded model")
    for cmd in ("list", "promote", "rollback"):
        psub.add_parser(cmd).add_argument("--task", default=None)
    a = psub.add_parser("alias", help="point an alias at a version (rollback = move production back)")
    a.add_argument("alias")
    a.add_argument("version", type=int)
    a.add_argument("--task", default=None)
    args = parser.parse_args(argv)
    if args.cmd == "prompt":
        if args.prompt_cmd == "try":
            from genops_assets.lib.prompts import PromptError
            from genops_assets.lib.tasks import TaskConfigError

            try:
                return prompt_try(args.task, args.prompt, args.model, args.n, base_model=args.base_model)
            except (PromptError, TaskConfigError) as exc:
                print(f"genops prompt try: {exc}", file=sys.stderr)
                return 2
        return prompt_admin(args)
    if args.cmd == "enhance":
        return enhance()
    if args.cmd == "rollback":
        return model_rollback(args.task, args.version)
    if args.cmd == "serve":
        return serve(args.host, args.port)
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
