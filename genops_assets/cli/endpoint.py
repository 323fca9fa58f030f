"""The serving side of the `genops` command: serve in the foreground, stop the local servers,
roll the champion back."""

from __future__ import annotations

import os
import sys

from genops_assets.cli.home import home, init_home, tracking

# The local servers genops starts, each with its state folder under the data directory.
SERVERS = ("endpoint", "judge")


def serve(host: str, port: int) -> int:
    """The server in the foreground (containers), one for every task: the embedded model
    converted once, or GENOPS_BASE_MODEL; adapters from GENOPS_ADAPTERS as model=folder,...
    where the model is a task's served name (``support_triage=/adapters/support_triage,
    product_qa:challenger=/adapters/qa-next``); it stops serving a task whose folder is removed
    from GENOPS_TASKS_DIR (default tasks/)."""
    import secrets

    from genops_assets.lib.base_model import convert_gguf, find_embedded_gguf
    from genops_assets.lib.hashing import atomic_write_text
    from genops_assets.serving import cli as server
    from genops_assets.serving import control

    root = init_home()
    base = os.environ.get("GENOPS_BASE_MODEL") or convert_gguf(find_embedded_gguf(), root / "models" / "base").path
    state_dir = root / "endpoint"
    state_dir.mkdir(parents=True, exist_ok=True)
    token = state_dir / control.TOKEN_FILE
    atomic_write_text(token, secrets.token_urlsafe(32))
    os.chmod(token, 0o600)
    from resources.settings import GenopsSettings

    tasks_dir = GenopsSettings.from_env().tasks_dir
    argv = ["--base-model", str(base), "--state-dir", str(state_dir), "--host", host, "--port", str(port),
            "--tasks-dir", str(tasks_dir)]
    for item in filter(None, (os.environ.get("GENOPS_ADAPTERS") or "").split(",")):
        argv += ["--adapter", item.strip()]
    server.main(argv)
    return 0


def stop(names: tuple[str, ...] = SERVERS) -> int:
    """Stop the local servers among ``names`` that are running."""
    from genops_assets.serving import control

    init_home()
    for name in names:
        if control.stop_server(home() / name):
            print(f"{name} server stopped")
    return 0


def model_rollback(task_name: str | None, version: str | None) -> int:
    """Move `champion` back (to ``version``, or the previous champion recorded at promotion);
    a server following the registry hot-swaps it."""
    from genops_assets.lib.audit import AuditLog, cli_actor, record_rollback
    from resources.tracking import RollbackError, registered_model_name

    init_home()
    mlflow, genops_home, task_res = tracking()
    name = registered_model_name(task_name or task_res.name)
    try:
        result = mlflow.rollback_champion(name, to_version=version, reason="manual (genops rollback)")
    except RollbackError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    record_rollback(AuditLog(genops_home.audit_path), result, actor=cli_actor())
    if result.action != "rolled_back":
        print(f"{name}: {result.reason}")
        return 0
    print(f"{name}: champion -> v{result.to_version} (was v{result.from_version}); the endpoint follows within seconds")
    return 0


def audit(model: str | None, limit: int) -> int:
    """The newest audit entries (deploys, promotions, rollbacks), of one model or all."""
    from genops_assets.lib.audit import AuditLog, markdown_table
    from resources.paths import GenopsHome

    root = init_home()
    print(markdown_table(AuditLog(GenopsHome(root=str(root)).audit_path).entries(model, limit=limit)))
    return 0
