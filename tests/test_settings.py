"""The environment is read in one place, GenopsSettings, and reaches the code location through its
resources: defaults, overrides, secrets bound as dg.EnvVar, and errors that name the variable."""

from __future__ import annotations

import os

import dagster as dg
import pytest

from resources import build_resources
from resources.settings import REPO_ROOT, GenopsSettings, SettingsError


@pytest.fixture(autouse=True)
def no_genops_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("GENOPS_"):
            monkeypatch.delenv(name)


def test_defaults_reach_the_resources(tmp_path):
    settings = GenopsSettings.from_env()
    assert settings.home == REPO_ROOT / ".genops" and settings.task == "support_triage"
    res = build_resources(home=tmp_path)
    # Every task folder is a graph of its own: no resource picks one; GENOPS_TASK is the demos' choice.
    assert "task" not in res
    from genops_assets.cli.home import demo_task

    assert (demo_task().tasks_dir, demo_task().name) == (str(REPO_ROOT / "tasks"), "support_triage")
    assert res["mlflow"].tracking_uri == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    endpoint = res["endpoint"]
    assert (endpoint.port, endpoint.canary_share, endpoint.api_keys, endpoint.client_key()) == (8008, 0.0, "", "local")
    judge = res["judge"]
    assert (judge.base_url, judge.model, judge.api_key, judge.local_port, judge.local_nice) == (
        None, "base", "unused", 8018, 10)
    assert res["feedback_store"].redactor is None and res["home"].background_nice == 10


def test_variables_override_and_empty_ones_count_as_unset(monkeypatch, tmp_path):
    env = {"GENOPS_HOME": str(tmp_path / "h"), "GENOPS_TASK": "product_qa", "GENOPS_ENDPOINT_PORT": "9100",
           "GENOPS_JUDGE_PORT": "9101", "GENOPS_JUDGE_MODEL": "", "GENOPS_CANARY_SHARE": "0.25",
           "GENOPS_MLFLOW_TRACKING_URI": "postgresql://mlflow@db/mlflow", "GENOPS_REDACTOR": "mod:fn"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    res = build_resources()
    from genops_assets.cli.home import demo_task

    assert res["home"].root == str(tmp_path / "h") and demo_task().name == "product_qa"
    assert (res["endpoint"].port, res["endpoint"].canary_share) == (9100, 0.25)
    assert (res["judge"].local_port, res["judge"].model) == (9101, "base")
    assert res["mlflow"].tracking_uri == "postgresql://mlflow@db/mlflow"
    assert res["feedback_store"].redactor == "mod:fn"
    assert build_resources(port=9200, judge_port=9201)["endpoint"].port == 9200


def test_secrets_are_bound_as_environment_variables_never_copied(monkeypatch, tmp_path):
    monkeypatch.setenv("GENOPS_API_KEYS", " k-first , k-second")
    monkeypatch.setenv("GENOPS_JUDGE_API_KEY", "judge-secret")
    res = build_resources(home=tmp_path)
    assert isinstance(res["endpoint"].api_keys, dg.EnvVar) and res["endpoint"].api_keys == "GENOPS_API_KEYS"
    assert isinstance(res["judge"].api_key, dg.EnvVar) and res["judge"].api_key == "GENOPS_JUDGE_API_KEY"
    assert res["endpoint"].client_key() == "k-first"  # the first key, outside a run as inside one
    monkeypatch.setenv("GENOPS_SERVING_BACKEND", "VLLM")
    monkeypatch.setenv("GENOPS_VLLM_BASE_URL", "http://vllm:8000/v1")
    monkeypatch.setenv("GENOPS_VLLM_API_KEY", "vllm-secret")
    vllm = build_resources(home=tmp_path)["endpoint"]
    assert vllm.base_url == "http://vllm:8000/v1" and vllm.api_key == "GENOPS_VLLM_API_KEY"
    assert vllm.lora_path_template == "{adapter_dir}"


@pytest.mark.parametrize(("name", "value", "message"), [
    ("GENOPS_ENDPOINT_PORT", "http", "GENOPS_ENDPOINT_PORT must be a valid integer"),
    ("GENOPS_CANARY_SHARE", "1.5", "GENOPS_CANARY_SHARE must be less than or equal to 1, got '1.5'"),
    ("GENOPS_SERVING_BACKEND", "tgi", "GENOPS_SERVING_BACKEND must be 'local' or 'vllm', got 'tgi'"),
    ("GENOPS_BACKGROUND_NICE", "20", "GENOPS_BACKGROUND_NICE must be less than or equal to 19, got '20'"),
])
def test_a_malformed_variable_fails_the_load_naming_it(monkeypatch, tmp_path, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=message):
        build_resources(home=tmp_path)


def test_vllm_backend_needs_its_url(monkeypatch, tmp_path):
    monkeypatch.setenv("GENOPS_SERVING_BACKEND", "vllm")
    with pytest.raises(ValueError, match="GENOPS_SERVING_BACKEND=vllm needs GENOPS_VLLM_BASE_URL"):
        build_resources(home=tmp_path)


def test_only_the_settings_module_reads_the_environment():
    """Code-location modules take settings from resources; os.environ is read in resources/settings.py
    (through pydantic-settings) and nowhere else among the resources, sensors, assets and lib."""
    offenders = []
    for folder in ("resources", "sensors", "genops_assets/defs", "genops_assets/lib"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if ("os.environ.get(" in line or "os.getenv(" in line or "os.environ[" in line) \
                        and not line.lstrip().startswith("#"):
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{no}")
    assert offenders == []
