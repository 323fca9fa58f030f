"""Start, reload, probe and stop the endpoint process; its state lives in one folder.

``<state_dir>/state.json`` records pid, address, base model and served adapter versions;
``server.log`` holds the process output; ``admin_token`` authorises hot reloads.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from genops_assets.lib.hashing import atomic_write_json, atomic_write_text

STATE_FILE = "state.json"
LOG_FILE = "server.log"
TOKEN_FILE = "admin_token"


class PortInUseError(RuntimeError):
    pass


class EndpointError(RuntimeError):
    pass


@dataclass(frozen=True)
class ServerState:
    pid: int
    host: str
    port: int
    base_model: str
    adapters: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    started_at: float = 0.0
    log_file: str = ""
    variants: dict[str, dict] = field(default_factory=dict)  # served name -> GGUF variant served by llama.cpp

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as dead
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def read_state(state_dir: Path) -> ServerState | None:
    """The running server's state, or None when none runs (a stale state file is removed)."""
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = ServerState(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        path.unlink(missing_ok=True)
        return None
    if not _alive(state.pid):
        path.unlink(missing_ok=True)
        return None
    return state


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def health(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_server(
    base_model: str,
    adapters: dict[str, str],
    versions: dict[str, str],
    state_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8008,
    ready_timeout_s: float = 240.0,
    dtype: str = "auto",
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> ServerState:
    """Start the endpoint in its own process group and wait until /health answers.

    ``extra_args`` are passed to the server's command line (limits, e.g. ``--rate-limit-rpm``);
    ``env`` is added to the inherited environment (e.g. ``GENOPS_API_KEYS``)."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    running = read_state(state_dir)
    if running is not None:
        raise EndpointError(f"an endpoint already runs from {state_dir} (pid {running.pid}); stop it first")
    if not port_free(host, port):
        raise PortInUseError(f"port {port} on {host} is in use: stop what listens there or set another port")
    token_path = state_dir / TOKEN_FILE
    atomic_write_text(token_path, secrets.token_urlsafe(32))
    os.chmod(token_path, 0o600)
    cmd = [sys.executable, "-m", "genops_assets.serving.cli", "--base-model", str(base_model),
           "--state-dir", str(state_dir), "--host", host, "--port", str(port), "--dtype", dtype]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    for name, version in versions.items():
        cmd += ["--version", f"{name}={version}"]
    cmd += [str(a) for a in extra_args]
    log_path = state_dir / LOG_FILE
    proc_env = {**os.environ, **(env or {}), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
                "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=proc_env, start_new_session=True)
    state = ServerState(pid=proc.pid, host=host, port=port, base_model=str(base_model),
                        adapters={k: str(v) for k, v in adapters.items()}, versions=dict(versions),
                        started_at=time.time(), log_file=str(log_path))
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EndpointError(f"endpoint exited with code {proc.returncode} while starting; "
                                f"log {log_path}:\n{_log_tail(log_path)}")
        if health(state.url, timeout=1.0):
            atomic_write_json(state_dir / STATE_FILE, asdict(state))
            return state
        time.sleep(0.5)
    _terminate(proc.pid)
    raise EndpointError(f"endpoint not ready after {ready_timeout_s:.0f}s; log {log_path}:\n{_log_tail(log_path)}")


def _admin(state_dir: Path, path: str, body: dict, what: str, timeout: float) -> ServerState:
    """POST an admin call to the endpoint running from ``state_dir``; its state before the call."""
    state = read_state(state_dir)
    if state is None:
        raise EndpointError(f"no endpoint runs from {state_dir}")
    token = (state_dir / TOKEN_FILE).read_text().strip()
    req = urllib.request.Request(f"{state.url}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise EndpointError(f"{what} refused: {exc.read().decode(errors='replace')}") from exc
    return state


def reload_adapter(state_dir: Path, name: str, adapter_dir: str, version: str, timeout: float = 300.0) -> ServerState:
    """Hot-swap the adapter served as ``name`` in the running endpoint (no restart)."""
    state_dir = Path(state_dir)
    state = _admin(state_dir, "/admin/reload", {"name": name, "adapter_dir": str(adapter_dir), "version": str(version)},
                   f"reload of '{name}' from {adapter_dir}", timeout)
    new = ServerState(**{**asdict(state), "adapters": {**state.adapters, name: str(adapter_dir)},
                         "versions": {**state.versions, name: str(version)},
                         "variants": {k: v for k, v in state.variants.items() if k != name}})
    atomic_write_json(state_dir / STATE_FILE, asdict(new))
    return new


def reload_variant(state_dir: Path, name: str, variant: Mapping, version: str, timeout: float = 300.0) -> ServerState:
    """Serve GGUF ``variant`` (a VariantFiles dict) as ``name`` in the running endpoint: it starts a
    llama.cpp server for it, flips the route once that answers, then stops the one it replaces."""
    state_dir = Path(state_dir)
    state = _admin(state_dir, "/admin/variant", {"name": name, "variant": dict(variant), "version": str(version)},
                   f"deploying variant '{variant.get('name')}' as '{name}'", timeout)
    new = ServerState(**{**asdict(state), "versions": {**state.versions, name: str(version)},
                         "variants": {**state.variants, name: dict(variant)}})
    atomic_write_json(state_dir / STATE_FILE, asdict(new))
    return new


def _terminate(pid: int, grace_s: float = 15.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            if not _alive(pid):
                return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def stop_server(state_dir: Path) -> bool:
    """Stop the endpoint started from ``state_dir``; False when none was running."""
    state = read_state(Path(state_dir))
    (Path(state_dir) / STATE_FILE).unlink(missing_ok=True)
    if state is None:
        return False
    _terminate(state.pid)
    return True
