"""A registered version is an MLflow model: loaded from the registry with ``mlflow.pyfunc`` it
answers golden examples exactly as the endpoint does (greedy), ``mlflow models serve`` serves
it over HTTP, its adapter files stay where every reader of the registry finds them, and a
missing or changed base model is a clear error naming the folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from graph_support import free_port, http_server, register_version

from genops_assets.lib.hashing import file_digests
from genops_assets.lib.prompts import prompt_registry_name
from genops_assets.lib.tasks import load_task, read_raw_file
from genops_assets.serving.registry_watch import ADAPTER_PATH_TAG
from resources.tracking import CHAMPION, MODEL_ID_TAG, MlflowTracking, registered_model_name

ROOT = Path(__file__).resolve().parents[1]
TASK = "support_triage"
MODEL = registered_model_name(TASK)
CHAMPION_URI = f"models:/{MODEL}@{CHAMPION}"
MAX_NEW_TOKENS = 24  # the registered prompt's own limit: the endpoint and the model both honour it


def tracking_at(root: Path) -> MlflowTracking:
    return MlflowTracking(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", artifact_root=(root / "artifacts").as_uri())


def golden_inputs(spec, n: int = 4) -> list[str]:
    return [ex.input_text for path in spec.raw_files() for ex in read_raw_file(path, spec)][:n]


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir, tiny_adapter_dir):
    """A registry whose champion is the tiny adapter, registered as tuning registers it."""
    root = tmp_path_factory.mktemp("mlflow-model")
    tracking = tracking_at(root)
    spec = load_task(ROOT / "tasks", TASK)
    short = replace(spec.prompt, max_new_tokens=MAX_NEW_TOKENS)
    prompt, _ = tracking.register_prompt(prompt_registry_name(TASK), short, "the task folder's prompt, shorter answers")
    version = register_version(tracking, prompt, tiny_adapter_dir, tiny_model_dir)
    tracking.promote(MODEL, version, {})
    return SimpleNamespace(root=root, tracking=tracking, spec=spec, prompt=prompt, version=version,
                           env={**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri})


@pytest.mark.graph
def test_a_version_is_an_mlflow_model_that_keeps_its_adapter_files(registry, tiny_adapter_dir, tmp_path):
    from mlflow.models import get_model_info
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    tracking = registry.tracking
    mv = tracking.get_version(MODEL, registry.version)
    with _use_tracking_uri(tracking.tracking_uri):
        info = get_model_info(CHAMPION_URI)
    assert "python_function" in info.flavors and info.model_id == mv.tags[MODEL_ID_TAG]
    assert info.signature.inputs.input_names() == ["message"]
    assert mv.source == f"models:/{info.model_id}"
    # Lineage: the LoggedModel is the tuning run's output and knows its registered version.
    logged = tracking.client().get_logged_model(info.model_id)
    assert logged.source_run_id == mv.run_id
    assert {"name": MODEL, "version": int(registry.version)} in json.loads(logged.tags["mlflow.modelVersions"])
    # Every reader of the registry (evaluation, deployment, the endpoint's watcher) gets the
    # adapter files, digest-checked, from inside the model.
    assert mv.tags[ADAPTER_PATH_TAG].startswith("artifacts/")
    fetched = tracking.fetch_registered_adapter(tmp_path / "cache", MODEL, registry.version)
    assert file_digests(fetched) == file_digests(tiny_adapter_dir)
    # The model's prompt is the registered version's, with its generation parameters.
    import mlflow.artifacts

    model_dir = tracking.client().get_model_version_download_uri(MODEL, registry.version)
    prompt_path = info.flavors["python_function"]["artifacts"]["prompt"]["path"]
    prompt = json.loads(mlflow.artifacts.load_text(f"{model_dir}/{prompt_path}"))
    assert prompt == json.loads(json.dumps(registry.prompt.served()))
    assert prompt["template"]["max_new_tokens"] == MAX_NEW_TOKENS


PREDICT = """
import json, sys
import mlflow
import pandas as pd
inputs = json.loads(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
frame = model.predict(pd.DataFrame({"message": inputs}))
rows = model.predict([{"message": m} for m in inputs])
print(json.dumps({"frame": list(frame), "rows": list(rows)}))
"""


@pytest.mark.server
def test_the_champion_loaded_with_pyfunc_answers_as_the_endpoint(registry, tiny_model_dir, home):
    from openai import OpenAI

    from genops_assets.defs.deployment.assets import request_for
    from resources.endpoint import LocalEndpoint

    inputs = golden_inputs(registry.spec)
    # A fresh process, so nothing of this one (loaded models, the tracking URI) helps it.
    out = subprocess.run([sys.executable, "-c", PREDICT, json.dumps(inputs), CHAMPION_URI], env=registry.env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    answers = json.loads(out.stdout.strip().splitlines()[-1])
    assert answers["frame"] == answers["rows"] and len(answers["frame"]) == len(inputs)
    assert all(answers["frame"])

    # The endpoint, deployed as deployed_endpoint deploys a champion, asked as its parity check asks.
    endpoint = LocalEndpoint(state_dir=str(home / "endpoint"), port=free_port(), ready_timeout_s=240)
    endpoint.publish_prompt(TASK, registry.prompt.served())
    adapter = registry.tracking.fetch_registered_adapter(home / "registry", MODEL, registry.version)
    outcome = endpoint.deploy(str(tiny_model_dir), TASK, CHAMPION, str(adapter), registry.version)
    client = OpenAI(base_url=outcome.url, api_key=endpoint.client_key(), timeout=120, max_retries=0)
    served = []
    for text in inputs:
        reply = client.chat.completions.create(model=TASK, temperature=0.0,
                                               **request_for({"input": text}, registry.spec, registry.prompt, True))
        assert reply.model_extra["genops"]["prompt_version"] == str(registry.prompt.version)
        assert reply.usage.completion_tokens <= MAX_NEW_TOKENS
        served.append(reply.choices[0].message.content)
    assert answers["frame"] == served
    # The base model alone answers otherwise: the adapter is applied.
    # (the base model has no deployed prompt: it is sent the rendered messages)
    base = client.chat.completions.create(model="base", temperature=0.0,
                                          **request_for({"input": inputs[0]}, registry.spec, registry.prompt, False))
    assert base.choices[0].message.content != served[0]


@pytest.mark.server
def test_mlflow_models_serve_answers_over_http(registry, tmp_path, monkeypatch):
    import mlflow

    text = golden_inputs(registry.spec, 1)[0]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking.tracking_uri)
    expected = mlflow.pyfunc.load_model(CHAMPION_URI).predict([{"message": text}])

    port = free_port()
    # No network: the local environment serves it (nothing is installed); MLflow starts the
    # environment's uvicorn from PATH.
    env = {**registry.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", CHAMPION_URI,
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with http_server(cmd, f"{url}/ping", tmp_path / "serve.log", 300, env=env):
        body = json.dumps({"dataframe_records": [{"message": text}]}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            predictions = json.loads(r.read())["predictions"]
        assert predictions == expected and predictions[0]
        # A row without the prompt's input field is refused, naming it.
        bad = json.dumps({"dataframe_records": [{"msg": text}]}).encode()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"{url}/invocations", data=bad,
                                                          headers={"Content-Type": "application/json"}), timeout=60)
        assert refused.value.code == 400 and "message" in refused.value.read().decode()


@pytest.mark.graph
def test_a_missing_or_changed_base_model_is_a_clear_error(tmp_path, tiny_model_dir, tiny_adapter_dir, monkeypatch):
    import mlflow

    from genops_assets.lib.base_model import BaseModelError

    tracking = tracking_at(tmp_path)
    spec = load_task(ROOT / "tasks", TASK)
    prompt, _ = tracking.register_prompt(prompt_registry_name(TASK), spec.prompt, "the task folder's prompt")
    base = tmp_path / "models" / tiny_model_dir.name  # a copy of the base model, under its own name
    shutil.copytree(tiny_model_dir, base)
    version = register_version(tracking, prompt, tiny_adapter_dir, base)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri)
    uri = f"models:/{MODEL}/{version}"

    (base / "tokenizer_config.json").write_text((base / "tokenizer_config.json").read_text() + " ")
    with pytest.raises(BaseModelError, match=re.escape(f"base model folder {base} changed since")):
        mlflow.pyfunc.load_model(uri)

    shutil.move(base, tmp_path / "elsewhere")
    with pytest.raises(BaseModelError, match=re.escape(f"base model folder {base} is missing")):
        mlflow.pyfunc.load_model(uri)

    # Pointed at an intact copy, it loads and answers; the digest is checked all the same.
    model = mlflow.pyfunc.load_model(uri, model_config={"base_model_path": str(tiny_model_dir)})
    (answer,) = model.predict([{"message": "my camera is offline"}], params={"max_new_tokens": 4})
    assert isinstance(answer, str) and answer
    with pytest.raises(BaseModelError, match="changed since"):
        mlflow.pyfunc.load_model(uri, model_config={"base_model_path": str(tmp_path / "elsewhere")})


@pytest.mark.graph
def test_a_task_with_passages_takes_them_as_a_column(tmp_path, tiny_model_dir, tiny_adapter_dir, monkeypatch):
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from genops_assets.lib.formatting import prompt_variables
    from genops_assets.serving.generation import generate
    from genops_assets.serving.mlflow_model import ADAPTER_NAME

    tracking = tracking_at(tmp_path)
    spec = load_task(ROOT / "tasks", "product_qa")
    prompt, _ = tracking.register_prompt(prompt_registry_name(spec.name), spec.prompt, "the task folder's prompt")
    version = register_version(tracking, prompt, tiny_adapter_dir, tiny_model_dir, task=spec.name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{registered_model_name(spec.name)}/{version}")
    assert model.metadata.get_input_schema().input_names() == ["question", "contexts"]

    rows = [("How often do I change the filter?", ["Replace the HEPA filter every 12 months.", "Wipe the pre-filter."]),
            ("Does it have a night mode?", ["Night mode dims the lights and runs the fan at its lowest speed."])]
    answers = model.predict(pd.DataFrame({"question": [q for q, _ in rows], "contexts": [c for _, c in rows]}),
                            params={"max_new_tokens": 6})
    # The passages are rendered as the endpoint renders a client's prompt_variables.
    loaded = model.unwrap_python_model().loaded
    expected = generate(loaded, [spec.prompt.render(prompt_variables(spec, q, c)) for q, c in rows],
                        adapter=ADAPTER_NAME, max_new_tokens=6)
    assert answers == [r.text for r in expected] and all(answers)
    with pytest.raises(MlflowException, match="contexts"):
        model.predict(pd.DataFrame({"question": ["Does it have a night mode?"]}))
