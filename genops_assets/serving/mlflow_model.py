"""A registered version as an MLflow model: ``mlflow.pyfunc.load_model("models:/genops-<task>@champion")``
answers offline as the endpoint does, and ``mlflow models serve`` serves it.

The pyfunc's artifacts are the version's LoRA adapter and its prompt (``prompt.json``, the
same record the endpoint renders ``prompt_variables`` with). The base model is not copied
into every version: the model config records its folder and sha256 folder digest, and
loading refuses a folder that is missing or whose digest changed, so a version never answers
from another base model than the one it was trained and evaluated on. A copy elsewhere is
loaded with ``model_config={"base_model_path": ...}`` (``MLFLOW_PYFUNC_INFERENCE_CONFIG`` for
``mlflow models serve``); its digest is checked all the same.

Answers come from the serving package: the same model and adapter loading, prompt rendering,
chat template and greedy decoding as the endpoint and the offline evaluation. torch,
transformers and peft are imported when a model is loaded, not with this module.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd  # imported by mlflow.pyfunc already

ADAPTER_ARTIFACT = "adapter"
PROMPT_ARTIFACT = "prompt"
MODEL_NAME = "model"  # the LoggedModel's name within its run
ADAPTER_NAME = "adapter"  # the adapter's name inside the loaded model
MODEL_CODE = Path(__file__).with_name("mlflow_model_code.py")
# Installed packages the model runs with (pinned to this environment's versions).
RUNTIME_PACKAGES = ("genops", "mlflow", "torch", "transformers", "peft", "pandas")


def model_config(base_model_path: str, base_model_digest: str) -> dict[str, Any]:
    """The pyfunc's model config; each key can be overridden when the model is loaded."""
    return {"base_model_path": str(base_model_path), "base_model_digest": base_model_digest, "dtype": "auto",
            "device": "", "batch_size": 8}


def verify_base_model(path: str | Path, digest: str) -> Path:
    """The base model folder, when its sha256 folder digest is ``digest``; otherwise a
    ``BaseModelError`` naming the folder."""
    from genops_assets.lib.base_model import BaseModelError
    from genops_assets.lib.hashing import sha256_dir

    folder = Path(path)
    hint = ("; restore it, or load the model with model_config={'base_model_path': '<a copy of it>'} "
            "(MLFLOW_PYFUNC_INFERENCE_CONFIG for mlflow models serve)")
    if not (folder / "config.json").is_file():
        raise BaseModelError(f"base model folder {folder} is missing (no config.json there): this version was "
                             f"trained on the base model with sha256 folder digest {digest[:12]}{hint}")
    actual = sha256_dir(folder)
    if actual != digest:
        raise BaseModelError(f"base model folder {folder} changed since this version was registered: sha256 "
                             f"folder digest {actual[:12]}, registered {digest[:12]}{hint}")
    return folder


def _value(v: Any) -> Any:
    if hasattr(v, "tolist") and not isinstance(v, str):  # numpy arrays and scalars from a DataFrame
        v = v.tolist()
    return v


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def input_rows(model_input: Any) -> list[dict[str, Any]]:
    """The prompt variables of each input: a DataFrame's rows, a list of dicts, or one dict."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, Mapping):
        rows = [dict(model_input)]
    elif isinstance(model_input, Sequence) and not isinstance(model_input, str):
        rows = list(model_input)
    else:
        raise TypeError(f"expected a DataFrame, a list of dicts or a dict, got {type(model_input).__name__}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"input row {i}: expected a mapping of prompt variables, got {type(row).__name__}")
        out.append({str(k): value for k, v in row.items() if not _missing(value := _value(v))})
    return out


class AdapterVersionModel(mlflow.pyfunc.PythonModel):
    """The base model with one version's LoRA adapter and prompt. ``predict`` takes the task's
    input field (and ``contexts`` for a task whose prompt shows passages) per row and returns
    the answers, decoded greedily as the endpoint answers ``temperature=0``."""

    def load_context(self, context) -> None:
        from genops_assets.lib.prompts import PromptTemplate
        from genops_assets.serving.adapters import load_model

        config = context.model_config or {}
        base = verify_base_model(config["base_model_path"], config["base_model_digest"])
        prompt = json.loads(Path(context.artifacts[PROMPT_ARTIFACT]).read_text(encoding="utf-8"))
        self.prompt_version = str(prompt["version"])
        self.template = PromptTemplate(**prompt["template"])
        self.batch_size = int(config.get("batch_size") or 8)
        self.loaded = load_model(base, {ADAPTER_NAME: context.artifacts[ADAPTER_ARTIFACT]},
                                 dtype=str(config.get("dtype") or "auto"), device=config.get("device") or None)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        # The signature makes MLflow hand over a DataFrame (from a DataFrame, records or a dict).
        from genops_assets.lib.prompts import PromptError
        from genops_assets.serving.generation import generate

        messages = []
        for i, variables in enumerate(input_rows(model_input)):
            try:
                messages.append(self.template.render(variables))
            except (KeyError, ValueError) as exc:  # the endpoint answers these with a 400
                raise PromptError(f"input row {i}: prompt v{self.prompt_version}: {exc}") from exc
        max_new_tokens = int((params or {}).get("max_new_tokens") or self.template.max_new_tokens)
        results = generate(self.loaded, messages, adapter=ADAPTER_NAME, max_new_tokens=max_new_tokens,
                           temperature=0.0, batch_size=self.batch_size)
        return [r.text for r in results]


def signature(template):
    """Inputs: the prompt's input field (and its passages when the prompt shows them); output:
    the answer text; parameter: ``max_new_tokens`` (the prompt's by default)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    from genops_assets.lib.prompts import CONTEXTS_VARIABLE, template_variables

    inputs = [ColSpec(DataType.string, template.input_field)]
    shown = template_variables(template.system, "system") | template_variables(template.user, "user")
    if CONTEXTS_VARIABLE in shown:
        inputs.append(ColSpec(Array(DataType.string), CONTEXTS_VARIABLE))
    return ModelSignature(inputs=Schema(inputs), outputs=Schema([ColSpec(DataType.string)]),
                          params=ParamSchema([ParamSpec("max_new_tokens", DataType.long, template.max_new_tokens)]))


def requirements() -> list[str]:
    """The model's pip requirements: this environment's versions of what it imports."""
    found = []
    for name in RUNTIME_PACKAGES:
        try:
            found.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return found


def log_version_model(adapter_dir: str | Path, prompt: Mapping[str, Any], base_model_path: str,
                      base_model_digest: str, tags: Mapping[str, str]):
    """Log the adapter and prompt as a pyfunc LoggedModel of the active run (``ModelInfo``).
    ``prompt`` is the served prompt record: name, version, digest, template."""
    from genops_assets.lib.prompts import PromptTemplate

    template = PromptTemplate(**prompt["template"])
    with tempfile.TemporaryDirectory(prefix="genops-model-") as tmp, warnings.catch_warnings():
        # No input example: MLflow would load the base model and generate to validate it.
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        prompt_file = Path(tmp) / "prompt.json"
        prompt_file.write_text(json.dumps(dict(prompt), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(MODEL_CODE),  # models from code: nothing pickled
            artifacts={ADAPTER_ARTIFACT: str(adapter_dir), PROMPT_ARTIFACT: str(prompt_file)},
            model_config=model_config(base_model_path, base_model_digest),
            signature=signature(template),
            pip_requirements=requirements(),  # given: MLflow would otherwise load the model to infer them
            prompts=[f"prompts:/{prompt['name']}/{prompt['version']}"],
            tags=dict(tags),
        )


def adapter_subpath(info) -> str:
    """Where the adapter files lie inside the logged model's folder (``artifacts/...``)."""
    return info.flavors["python_function"]["artifacts"][ADAPTER_ARTIFACT]["path"]
