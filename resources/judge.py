"""The judge: any OpenAI-compatible chat endpoint, or genops' own server on the base model.

With no ``base_url`` genops starts (once, then reuses) a local judge server on the base
model in ``<data dir>/judge/``. Point ``base_url`` at a vLLM server or a hosted model to use a
stronger judge; the key comes from the environment (``GENOPS_JUDGE_API_KEY``), never config.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field

from resources.settings import DEFAULT_BACKGROUND_NICE


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

    def endpoint_url(self, base_model_path: str | None) -> str:
        """The judge's base URL, starting the local judge server when none is configured."""
        if self.base_url:
            return self.base_url
        from genops_assets.serving import control

        if not self.local_state_dir or not base_model_path:
            raise ValueError("no judge base_url set and no local judge state_dir / base model to start one")
        state_dir = Path(self.local_state_dir)
        state = control.read_state(state_dir)
        if state is not None and (state.base_model != str(base_model_path) or not control.health(state.url)):
            control.stop_server(state_dir)
            state = None
        if state is None:
            # The local judge is internal: no API keys, whatever the public endpoint requires.
            # It is background work: the production endpoint comes first on shared cores.
            state = control.start_server(str(base_model_path), {}, {}, state_dir, port=self.local_port,
                                         env={"GENOPS_API_KEYS": ""}, extra_args=["--nice", str(self.local_nice)])
        return f"{state.url}/v1"

    def connect(self, base_model_path: str | None = None, cache=None):
        from genops_assets.lib.judging import ChatJudge

        return ChatJudge(self.endpoint_url(base_model_path), self.model, api_key=self.api_key,
                         timeout_s=self.timeout_s, max_retries=self.max_retries, backoff_s=self.backoff_s,
                         max_concurrency=self.max_concurrency, explain=self.explain, cache=cache)

    def stop_local(self) -> None:
        from genops_assets.serving import control

        if self.local_state_dir:
            control.stop_server(Path(self.local_state_dir))
