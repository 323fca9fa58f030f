"""Serving backends behind the deploy asset: genops' own local server, or a vLLM OpenAI server.

Both take the same calls from ``deployed_endpoint``, each naming the task: ``publish_prompt``
(the prompt version the endpoint renders for that task), ``deploy`` (serve an adapter as the
task's champion or challenger, hot-swapping a running one and leaving every other task's
models as they are) and ``url``. One endpoint serves every task; clients select a task's
version by model name (``protocol.served_name``: ``support_triage``,
``support_triage:challenger``). The vLLM backend drives a running vLLM server through its
runtime LoRA API (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``; the server needs
``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from pydantic import Field

from genops_assets.serving.protection import parse_api_keys, plaintext_keys
from genops_assets.serving.protocol import ROLES, ModelName, served_name


@dataclass(frozen=True)
class DeployOutcome:
    action: str  # "started" | "reloaded" | "unchanged"
    url: str
    pid: int
    port: int
    version: str


def client_api_key(api_keys: str | None, client_key: str | None = None) -> str:
    """The key genops' own clients (deploy checks, the demo) send: ``client_key``
    (``GENOPS_CLIENT_API_KEY``) when set, else the first key of ``api_keys`` (``GENOPS_API_KEYS``,
    comma-separated) given in plain when the endpoint requires keys."""
    if client_key:
        return client_key
    keys = parse_api_keys(api_keys)
    plain = plaintext_keys(keys)
    if keys and not plain:
        raise ValueError("GENOPS_API_KEYS lists only sha256 digests: set GENOPS_CLIENT_API_KEY to the key genops' "
                         "own requests to the endpoint send (one whose digest is listed)")
    return plain[0] if plain else "local"


class ServingBackend(dg.ConfigurableResource):
    """What the deploy asset needs from a serving backend."""

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def renders_prompts(self) -> bool:
        """Whether requests may send ``prompt_variables`` instead of messages."""
        return False

    def client_key(self) -> str:
        """The bearer key genops' own requests to this endpoint send."""
        raise NotImplementedError

    def publish_prompt(self, task: str, prompt: dict) -> None:
        """Make ``prompt`` (name, version, digest, template) the one the endpoint renders for ``task``."""

    def publish_guardrails(self, task: str, cfg_json: str) -> None:
        """Make ``cfg_json`` (a validated ``GuardrailConfig`` as JSON) ``task``'s guardrails."""
        raise NotImplementedError(f"{type(self).__name__} does not apply genops' guardrails")

    def deploy(self, base_model: str, task: str, role: str, adapter_dir: str, version: str, *,
               variant: dict | None = None) -> DeployOutcome:
        """Serve ``adapter_dir`` (registry ``version``) as ``task``'s ``role`` (champion or
        challenger): the model ``served_name(task, role)``. ``variant`` (a VariantFiles dict plus
        its registry ``version``) serves that optimized variant instead of the adapter."""
        raise NotImplementedError


def _model(task: str, role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {list(ROLES)}, got {role!r}")
    return served_name(task, role)


class LocalEndpoint(ServingBackend):
    """genops' own server process on this machine; pid, port and log live in ``state_dir``."""

    state_dir: str
    host: str = "127.0.0.1"
    port: int = 8008
    ready_timeout_s: float = 240.0
    watch_registry: str | None = Field(None, description="MLflow tracking URI: the server follows the "
                                       "`champion` alias of every registered model named <watch_prefix><task> "
                                       "(manual promotion or rollback in MLflow) and serves <task>:v<N> from it")
    watch_prefix: str = Field("genops-", description="Registered models named <prefix><task> hold task versions")
    tasks_dir: str | None = Field(None, description="Folder of task folders: the server stops serving a task "
                                  "whose folder was removed")
    canary_share: float = Field(0.0, description="Share of each task's champion requests answered by its "
                                "challenger")
    canary_shares: str = Field("", description="Per-task shares over canary_share, as task=share,... "
                               "(e.g. support_triage=0.1)")
    api_keys: str = Field("", description="Bind with dg.EnvVar('GENOPS_API_KEYS') when the endpoint requires "
                          "keys (each a key or sha256:<hex digest>); never a literal")
    client_api_key: str = Field("", description="Bind with dg.EnvVar('GENOPS_CLIENT_API_KEY'): the key genops' own "
                                "requests send when GENOPS_API_KEYS lists digests only; never a literal")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def renders_prompts(self) -> bool:
        return True

    def client_key(self) -> str:
        # Dagster resolves a dg.EnvVar field for a run; used outside one (the demos), the field
        # still holds the variable's name.
        def value(field):
            return field.get_value() if isinstance(field, dg.EnvVar) else field

        return client_api_key(value(self.api_keys), value(self.client_api_key))

    def publish_prompt(self, task: str, prompt: dict) -> None:
        import json

        from genops_assets.lib.hashing import atomic_write_text
        from genops_assets.serving.routing import prompt_file

        # The server re-reads this file when it changes: a new prompt needs no restart.
        path = prompt_file(Path(self.state_dir), task)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(prompt))

    def publish_guardrails(self, task: str, cfg_json: str) -> None:
        import json

        from genops_assets.lib.guardrails.config import parse_guardrails
        from genops_assets.lib.hashing import atomic_write_text
        from genops_assets.serving.guard import guardrails_file

        # Validated here too: a bad file would make every request of the task fail with a 500.
        cfg = parse_guardrails(json.loads(cfg_json), f"guardrails of task '{task}'")
        # The server re-reads this file when it changes: new settings need no restart.
        path = guardrails_file(Path(self.state_dir), task)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, cfg.canonical_json())

    def deploy(self, base_model: str, task: str, role: str, adapter_dir: str, version: str, *,
               variant: dict | None = None) -> DeployOutcome:
        """Serve ``adapter_dir`` as ``task``'s ``role`` on ``base_model``; a no-op when already
        serving it. The first deploy starts the server; later ones, of any task, hot-swap that
        one model in the running server. A GGUF ``variant`` (engine ``llamacpp``) is served by a
        llama.cpp server the endpoint supervises, behind the same name, guardrails and logs."""
        from genops_assets.serving import control

        name = _model(task, role)
        if variant is not None:
            return self._deploy_variant(base_model, task, name, variant, version)
        state_dir = Path(self.state_dir)
        state = self._running(base_model, task)
        if state is not None:
            url = f"http://{state.host}:{state.port}/v1"
            if (state.versions.get(name) == version and name not in state.variants
                    and control.health(f"http://{state.host}:{state.port}")):
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
            extra_args=self._server_args(),
        )
        return DeployOutcome("started", f"http://{state.host}:{state.port}/v1", state.pid, state.port, version)

    def _running(self, base_model: str, task: str):
        """The endpoint's state when one serves ``base_model``; None when none runs (one on another
        base model that serves only ``task`` is stopped first)."""
        from genops_assets.serving import control

        # Every task shares the one base model: another base needs another server, which
        # must not take the other tasks' models down with it.
        state_dir = Path(self.state_dir)
        state = control.read_state(state_dir)
        if state is not None and state.base_model != str(base_model):
            others = sorted({ModelName.parse(n).task for n in state.versions} - {task, None})
            if others:
                raise control.EndpointError(
                    f"the endpoint at {state_dir} serves base model {state.base_model} for task(s) {others}; task "
                    f"'{task}' deploys on {base_model}: one endpoint serves one base model (use another "
                    f"state_dir and port for another base)")
            control.stop_server(state_dir)
            state = None
        return state

    def _deploy_variant(self, base_model: str, task: str, name: str, variant: dict, version: str) -> DeployOutcome:
        from genops_assets.serving import control

        engine, fmt = variant.get("engine"), variant.get("format")
        if engine != "llamacpp" or fmt != "gguf":
            raise ValueError(
                f"variant '{variant.get('name')}' ({fmt}, engine {engine}) cannot be served as '{name}' by the local "
                "endpoint: it serves a task's adapter on its base model, or a GGUF variant on llama.cpp; serve a "
                "merged or distilled safetensors model by starting an endpoint with that folder as its base model")
        state_dir = Path(self.state_dir)
        state = self._running(base_model, task)
        action = "reloaded"
        if state is None:
            # The endpoint's base model stays the front door: its tokenizer renders the prompts.
            state = control.start_server(base_model=base_model, adapters={}, versions={}, state_dir=state_dir,
                                         host=self.host, port=self.port, ready_timeout_s=self.ready_timeout_s,
                                         extra_args=self._server_args())
            action = "started"
        elif (state.versions.get(name) == version
              and state.variants.get(name, {}).get("digest") == variant.get("digest")
              and control.health(f"http://{state.host}:{state.port}")):
            return DeployOutcome("unchanged", f"http://{state.host}:{state.port}/v1", state.pid, state.port, version)
        state = control.reload_variant(state_dir, name, variant, version)
        return DeployOutcome(action, f"http://{state.host}:{state.port}/v1", state.pid, state.port, version)

    def _server_args(self) -> list[str]:
        args: list[str] = []
        if self.watch_registry:
            args += ["--watch-registry", self.watch_registry, "--watch-prefix", self.watch_prefix,
                     "--watch-alias", "champion"]
        if self.tasks_dir:
            args += ["--tasks-dir", str(self.tasks_dir)]
        if self.canary_share:
            args += ["--canary-share", str(self.canary_share)]
        if self.canary_shares:
            args += ["--canary-shares", self.canary_shares]
        return args

    def stop(self) -> None:
        from genops_assets.serving import control

        control.stop_server(Path(self.state_dir))


class VllmError(RuntimeError):
    """The vLLM server refused a call; the message carries its answer."""


class VllmEndpoint(ServingBackend):
    """A running vLLM OpenAI-compatible server (e.g. on GKE, see deploy/k8s/)."""

    base_url: str = Field(description="The server's OpenAI base URL, ending in /v1")
    api_key: str = Field("unused", description="Bind with dg.EnvVar('GENOPS_VLLM_API_KEY'); never a literal")
    base_model_name: str | None = Field(None, description="Model id vLLM serves as the base; checked on deploy")
    lora_path_template: str = Field("{adapter_dir}", description="Path of the adapter as the vLLM server sees it; "
                                    "placeholders {adapter_dir}, {task}, {name} (the served name), {version} (e.g. "
                                    "/adapters/{task}/v{version} "
                                    "for a volume the adapter-sync sidecar fills)")
    keep_versions: int = Field(2, description="Pinned versions of a task kept loaded as '<task>:v<version>' "
                               "(rollback targets)")
    timeout_s: float = Field(120.0)
    unguarded: bool = Field(False, description="vLLM serves without genops' guardrails (input and output "
                            "checks run in genops' own server only); true: deploy anyway, for a vLLM behind a "
                            "guardrail gateway of its own")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/")

    def publish_guardrails(self, task: str, cfg_json: str) -> None:
        if not self.unguarded:
            raise NotImplementedError(
                f"task '{task}': the vLLM backend runs without genops' guardrails (no input or output checks); "
                "serve with genops' own endpoint, or set GENOPS_VLLM_UNGUARDED=true to deploy unguarded")

    def client_key(self) -> str:
        return self.api_key

    def _call(self, method: str, path: str, body: dict | None = None):
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"}
        try:
            resp = httpx.request(method, f"{self.url}{path}", json=body, headers=headers, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise VllmError(f"vLLM server at {self.url} unreachable ({path}): {exc}") from exc
        return resp

    def loaded(self) -> dict[str, dict]:
        """Models the server lists: the base model and every loaded LoRA adapter."""
        resp = self._call("GET", "/models")
        if resp.status_code != 200:
            raise VllmError(f"GET {self.url}/models answered {resp.status_code}: {resp.text[:300]}")
        return {m["id"]: m for m in resp.json().get("data", [])}

    def load(self, lora_name: str, lora_path: str, replace: bool = False) -> None:
        body = {"lora_name": lora_name, "lora_path": lora_path}
        if replace:
            body["load_inplace"] = True
        resp = self._call("POST", "/load_lora_adapter", body)
        if resp.status_code != 200:
            raise VllmError(f"loading adapter '{lora_name}' from {lora_path}: {resp.status_code} {resp.text[:300]}")

    def unload(self, lora_name: str) -> None:
        resp = self._call("POST", "/unload_lora_adapter", {"lora_name": lora_name})
        if resp.status_code not in (200, 404):
            raise VllmError(f"unloading adapter '{lora_name}': {resp.status_code} {resp.text[:300]}")

    def deploy(self, base_model: str, task: str, role: str, adapter_dir: str, version: str, *,
               variant: dict | None = None) -> DeployOutcome:
        """Serve the adapter as ``task``'s ``role`` (the name clients ask for, e.g.
        ``support_triage``) and as ``<task>:v<version>`` (pinned); older pinned versions of the
        task beyond ``keep_versions`` are unloaded. Other tasks' adapters are not touched."""
        name = _model(task, role)
        if variant is not None:
            raise VllmError(
                f"variant '{variant.get('name')}' ({variant.get('format')}, engine {variant.get('engine')}) cannot be "
                f"served as '{name}' by the vLLM backend: it serves LoRA adapters on its base model; serve a GGUF "
                "variant with genops' local endpoint (llama.cpp), or deploy the adapter")
        models = self.loaded()
        bases = [m for m, info in models.items() if not info.get("parent")]
        if self.base_model_name and self.base_model_name not in bases:
            raise VllmError(f"vLLM at {self.url} serves {bases}, not the base model '{self.base_model_name}'")
        path = self.lora_path_template.format(adapter_dir=adapter_dir, name=name, task=task, version=version)
        pinned = served_name(task, f"v{version}")
        if pinned in models and name in models and models[name].get("root") == models[pinned].get("root"):
            return DeployOutcome("unchanged", self.url, 0, 0, version)
        if pinned not in models:
            self.load(pinned, path)
        if name in models:
            try:
                self.load(name, path, replace=True)
            except VllmError:
                # A server without in-place replacement: unload, then load (a moment without it).
                self.unload(name)
                self.load(name, path)
            action = "reloaded"
        else:
            self.load(name, path)
            action = "started"
        prefix = served_name(task, "v1")[:-1]
        old = sorted((m for m in self.loaded() if m.startswith(prefix) and m != pinned),
                     key=lambda m: int(m[len(prefix):]) if m[len(prefix):].isdigit() else -1)
        for m in old[: max(0, len(old) - (self.keep_versions - 1))]:
            self.unload(m)
        return DeployOutcome(action, self.url, 0, 0, version)
