"""The judge: any OpenAI-compatible chat endpoint, or genops' own server on the base model.

With no ``base_url`` genops starts (once, then reuses) a local judge server on the base
model in ``<data dir>/judge/``. Point ``base_url`` at a vLLM server or a hosted model to use a
stronger judge; the key comes from the environment (``GENOPS_JUDGE_API_KEY``), never config.

A task can earn a judge of its own: the ``judge_adapter`` asset tunes a LoRA judge and registers
it as a version of ``genops-<task>-judge``; alias ``certified`` moves to a version only when it
passed its certificate on held-out human labels. While that alias exists, ``connect(task=...)``
answers with that adapter on the local judge server (served as ``<task>:judge``, fetched from
the registry and checked against its recorded digest) instead of the configured judge.
"""

from __future__ import annotations

import logging
from pathlib import Path

import dagster as dg
from pydantic import Field

from resources.settings import DEFAULT_BACKGROUND_NICE

log = logging.getLogger("genops")

CERTIFIED = "certified"
"""Alias of the judge model version that passed its certificate on held-out human labels."""
BASE_MODEL_PATH_TAG = "genops.base_model_path"
"""Version tag of a judge adapter: the base model folder it was trained on."""


def judge_model_name(task: str) -> str:
    """The MLflow registered model that holds a task's tuned judge adapters."""
    return f"genops-{task}-judge"


class JudgeResource(dg.ConfigurableResource):
    base_url: str | None = Field(None, description="OpenAI-compatible base URL (…/v1); empty: local judge server")
    model: str = Field("base", description="Model name the endpoint serves as the judge")
    api_key: str = Field("unused", description="Bind with dg.EnvVar('GENOPS_JUDGE_API_KEY'); never a literal")
    max_concurrency: int = Field(8, description="Judge calls in flight at once")
    timeout_s: float = Field(120.0, description="Per-call timeout")
    max_retries: int = Field(4, description="Retries on 429 / 5xx / timeouts, with exponential backoff")
    backoff_s: float = Field(0.5, description="First backoff; doubles per retry")
    explain: bool = Field(False, description="Ask the judge for a one-sentence explanation of each verdict")
    price_in_per_1k: float | None = Field(None, description="Price per 1k prompt tokens, for cost reports")
    price_out_per_1k: float | None = Field(None, description="Price per 1k completion tokens")
    local_port: int = Field(8018, description="Port of the local judge server")
    local_state_dir: str | None = Field(None, description="State folder of the local judge server")
    local_nice: int = Field(DEFAULT_BACKGROUND_NICE, ge=0, le=19, description=(
        "CPU priority (nice) of the local judge server, beside the production endpoint (GENOPS_BACKGROUND_NICE)"))
    tracking_uri: str | None = Field(None, description=(
        "MLflow registry holding the tasks' tuned judges (genops-<task>-judge); empty: no tuned judges"))
    use_certified: bool = Field(True, description=(
        "Judge a task with its certified judge adapter (genops-<task>-judge@certified, on the local judge "
        "server) when it has one, in place of the configured judge"))

    def endpoint_url(self, base_model_path: str | None) -> str:
        """The judge's base URL, starting the local judge server when none is configured."""
        if self.base_url:
            return self.base_url
        return self.local_url(base_model_path)

    def local_url(self, base_model_path: str | None) -> str:
        """The local judge server's base URL, starting it on ``base_model_path`` when it does not
        run (or runs on another base model)."""
        from genops_assets.serving import control

        if not self.local_state_dir or not base_model_path:
            raise ValueError("no judge base_url set and no local judge state_dir / base model to start one")
        state_dir = Path(self.local_state_dir)
        state = control.read_state(state_dir)
        if state is not None and (state.base_model != str(base_model_path) or not control.health(state.url)):
            control.stop_server(state_dir)
            state = None
        if state is None:
            # The local judge is internal: no API keys, whatever the public endpoint requires, and no
            # guardrails (its prompts quote the answers it judges, attacks included).
            # It is background work: the production endpoint comes first on shared cores.
            state = control.start_server(str(base_model_path), {}, {}, state_dir, port=self.local_port,
                                         env={"GENOPS_API_KEYS": ""},
                                         extra_args=["--nice", str(self.local_nice), "--guardrails", "off"])
        return f"{state.url}/v1"

    def connect(self, base_model_path: str | None = None, cache=None, task: str | None = None):
        """A judge client: ``task``'s certified judge adapter when it has one (and it was trained
        on ``base_model_path``), else the configured judge. ``client.model`` says which."""
        certified = self.certified_version(task) if task else None
        if certified is not None:
            trained_on = certified.tags.get(BASE_MODEL_PATH_TAG)
            if base_model_path and trained_on == str(base_model_path):
                return self.connect_version(base_model_path, task, certified.version, cache=cache, certified=True)
            log.warning("%s v%s is certified but was trained on base model %s, not %s: using the configured judge",
                        judge_model_name(task), certified.version, trained_on, base_model_path)
        return self._client(self.endpoint_url(base_model_path), self.model, cache)

    def certified_version(self, task: str):
        """The version of ``task``'s judge model behind alias ``certified`` (an MLflow
        ModelVersion), or None: no registry configured, no such model or alias, or
        ``use_certified`` off."""
        if not (self.use_certified and self.tracking_uri):
            return None
        from mlflow.exceptions import MlflowException

        try:
            return self._registry().get_model_version_by_alias(judge_model_name(task), CERTIFIED)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def connect_version(self, base_model_path: str, task: str, version: str | int, cache=None,
                        certified: bool = False):
        """A client for registered version ``version`` of ``task``'s judge model on the local
        judge server: served as ``<task>:judge`` when ``certified``, else as
        ``<task>:judge-v<N>`` (a version being certified). The adapter is fetched from the
        registry, checked against its recorded digest, and loaded when the server does not
        serve that version under that name yet."""
        from genops_assets.serving import control
        from genops_assets.serving.protocol import judge_name
        from genops_assets.serving.registry_watch import fetch_adapter

        if not self.tracking_uri:
            raise ValueError("the judge resource has no tracking_uri: it cannot fetch a registered judge adapter")
        model_name = judge_model_name(task)
        state_dir = Path(self.local_state_dir or "")
        folder = fetch_adapter(self._registry(), self.tracking_uri, model_name, str(version), state_dir / "registry")
        url = self.local_url(base_model_path)
        served = judge_name(task) if certified else judge_name(task, version)
        state = control.read_state(state_dir)
        if state is None or state.versions.get(served) != str(version):
            control.reload_adapter(state_dir, served, str(folder), str(version))
        return self._client(url, served, cache, model_version=f"{model_name}/{version}")

    def _registry(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def _client(self, url: str, model: str, cache, model_version: str = ""):
        from genops_assets.lib.judging import ChatJudge

        return ChatJudge(url, model, api_key=self.api_key, timeout_s=self.timeout_s, max_retries=self.max_retries,
                         backoff_s=self.backoff_s, max_concurrency=self.max_concurrency, explain=self.explain,
                         cache=cache, model_version=model_version)

    def stop_local(self) -> None:
        from genops_assets.serving import control

        if self.local_state_dir:
            control.stop_server(Path(self.local_state_dir))
