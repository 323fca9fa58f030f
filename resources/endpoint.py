"""The serving endpoint as a resource: start, reload and query the local OpenAI-compatible server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg


@dataclass(frozen=True)
class DeployOutcome:
    action: str  # "started" | "reloaded" | "unchanged"
    url: str
    pid: int
    port: int
    version: str


class LocalEndpoint(dg.ConfigurableResource):
    """genops' own server process on this machine; pid, port and log live in ``state_dir``."""

    state_dir: str
    host: str = "127.0.0.1"
    port: int = 8008
    ready_timeout_s: float = 240.0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def deploy(self, base_model: str, name: str, adapter_dir: str, version: str) -> DeployOutcome:
        """Serve ``adapter_dir`` as model ``name`` on ``base_model``; a no-op when already serving it."""
        from genops_assets.lib.serving import control

        state_dir = Path(self.state_dir)
        state = control.read_state(state_dir)
        if state is not None and state.base_model != str(base_model):
            control.stop_server(state_dir)
            state = None
        if state is not None:
            url = f"http://{state.host}:{state.port}/v1"
            if state.versions.get(name) == version and control.health(f"http://{state.host}:{state.port}"):
                return DeployOutcome("unchanged", url, state.pid, state.port, version)
            state = control.reload_adapter(state_dir, name, adapter_dir, version)
            return DeployOutcome("reloaded", url, state.pid, state.port, version)
        state = control.start_server(
            base_model=base_model,
            adapters={name: adapter_dir},
            versions={name: version},
            state_dir=state_dir,
            host=self.host,
            port=self.port,
            ready_timeout_s=self.ready_timeout_s,
        )
        return DeployOutcome("started", f"http://{state.host}:{state.port}/v1", state.pid, state.port, version)

    def stop(self) -> None:
        from genops_assets.lib.serving import control

        control.stop_server(Path(self.state_dir))
