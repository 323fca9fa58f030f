"""The vLLM serving backend against a stand-in for a vLLM OpenAI server (an outside boundary:
vLLM needs a GPU build that this machine cannot run). The stand-in implements the documented
runtime LoRA API: /v1/models lists the base model and each adapter (``root`` = its path,
``parent`` = the base), /v1/load_lora_adapter refuses a name already loaded unless
``load_inplace`` is set, /v1/unload_lora_adapter answers 404 for an unknown name."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from graph_support import free_port
from judge_standin import BackgroundServer

from resources.endpoint import VllmEndpoint, VllmError

pytestmark = pytest.mark.server

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


class StandInVllm(BackgroundServer):
    def __init__(self, port: int, inplace: bool = True):
        self.loras: dict[str, str] = {}
        self.calls: list[tuple[str, dict]] = []
        app = FastAPI()

        @app.get("/v1/models")
        def models():
            data = [{"id": BASE, "object": "model", "root": BASE, "parent": None}]
            data += [{"id": n, "object": "model", "root": p, "parent": BASE} for n, p in self.loras.items()]
            return {"object": "list", "data": data}

        @app.post("/v1/load_lora_adapter")
        async def load(request: Request):
            body = await request.json()
            self.calls.append(("load", body))
            name = body["lora_name"]
            if name in self.loras and not (inplace and body.get("load_inplace")):
                return JSONResponse({"error": {"message": f"The lora adapter '{name}' has already been loaded."}},
                                    status_code=400)
            self.loras[name] = body["lora_path"]
            return f"Success: LoRA adapter '{name}' added successfully."

        @app.post("/v1/unload_lora_adapter")
        async def unload(request: Request):
            body = await request.json()
            self.calls.append(("unload", body))
            if self.loras.pop(body["lora_name"], None) is None:
                return JSONResponse({"error": {"message": "not found"}}, status_code=404)
            return "Success"

        self.serve(app, port)


@pytest.mark.parametrize("inplace", [True, False])
def test_deploy_loads_pins_swaps_and_prunes_versions_per_task(inplace):
    with StandInVllm(free_port(), inplace=inplace) as vllm:
        backend = VllmEndpoint(base_url=vllm.url, base_model_name=BASE,
                               lora_path_template="/adapters/{task}/v{version}", keep_versions=2)
        assert backend.deploy("ignored", "triage", "champion", "/local/a1", "1").action == "started"
        assert vllm.loras == {"triage:v1": "/adapters/triage/v1", "triage": "/adapters/triage/v1"}
        assert backend.deploy("ignored", "triage", "champion", "/local/a1", "1").action == "unchanged"
        # Another task on the same server: its own names, nothing of the first task touched.
        assert backend.deploy("ignored", "qa", "challenger", "/local/q1", "1").action == "started"
        assert vllm.loras["qa:challenger"] == vllm.loras["qa:v1"] == "/adapters/qa/v1"

        assert backend.deploy("ignored", "triage", "champion", "/local/a2", "2").action == "reloaded"
        assert vllm.loras["triage"] == "/adapters/triage/v2"
        assert set(vllm.loras) == {"triage", "triage:v1", "triage:v2", "qa:challenger", "qa:v1"}  # v1 kept
        backend.deploy("ignored", "triage", "champion", "/local/a3", "3")
        assert set(vllm.loras) == {"triage", "triage:v2", "triage:v3", "qa:challenger", "qa:v1"}  # v1 pruned
        # Rollback is a deploy of the older version: the pinned copy is reused, nothing reloaded twice.
        backend.deploy("ignored", "triage", "champion", "/local/a2", "2")
        assert vllm.loras["triage"] == "/adapters/triage/v2"
        unloads = [b["lora_name"] for kind, b in vllm.calls if kind == "unload"]
        assert "triage:v1" in unloads and not any(n.startswith("qa") for n in unloads)
        if not inplace:  # no in-place replacement on this server: unload then load
            assert "triage" in unloads
        with pytest.raises(ValueError, match="role must be one of"):
            backend.deploy("ignored", "triage", "v3", "/local/a3", "3")


def test_wrong_base_model_and_unreachable_server_are_clear_errors():
    with StandInVllm(free_port()) as vllm:
        backend = VllmEndpoint(base_url=vllm.url, base_model_name="some/other-model")
        with pytest.raises(VllmError, match="not the base model 'some/other-model'"):
            backend.deploy("x", "triage", "champion", "/a", "1")
        assert vllm.loras == {}
    with pytest.raises(VllmError, match="unreachable"):
        VllmEndpoint(base_url=f"http://127.0.0.1:{free_port()}/v1", timeout_s=2).deploy("x", "triage", "champion",
                                                                                         "/a", "1")
