"""The code location loads fast, validates, lists the lifecycle assets, and imports no ML library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
HEAVY = ["torch", "transformers", "peft", "trl", "deepspeed", "great_expectations", "ragas"]
REQUIRED_ASSETS = {"base_model", "golden_eval_dataset", "sft_dataset", "few_shot_examples",
                   "tuned_adapter", "eval_report", "deployed_endpoint", "raw_task_examples"}


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "GENOPS_HOME": str(tmp_path / "home"), "DAGSTER_HOME": str(tmp_path / "dh")}


@pytest.mark.server
def test_loading_definitions_imports_no_heavy_library(tmp_path):
    code = (
        "import sys, json; import genops_assets.definitions as d; "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@pytest.mark.server
def test_dagster_definitions_validate(tmp_path):
    (tmp_path / "dh").mkdir()
    res = subprocess.run([str(Path(sys.executable).with_name("dagster")), "definitions", "validate",
                          "-m", "genops_assets.definitions"], cwd=REPO, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=180, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_asset_graph_has_the_lifecycle_and_gates():
    from genops_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys >= REQUIRED_ASSETS
    upstream = {k.to_user_string() for k in graph.get(__import__("dagster").AssetKey("tuned_adapter")).parent_keys}
    assert {"base_model", "sft_dataset"} <= upstream
    checks = {c.name for c in graph.asset_check_keys}
    assert {"gx_golden_eval_dataset", "gx_sft_dataset", "gx_few_shot_examples", "beats_champion"} <= checks
    for name in ("gx_sft_dataset", "beats_champion"):
        key = next(c for c in graph.asset_check_keys if c.name == name)
        assert graph.get_check_spec(key).blocking, name
    assert defs.resolve_job_def("genops_loop") and defs.resolve_job_def("continuous_training")


def test_workspace_yaml_points_at_the_code_location():
    ws = yaml.safe_load((REPO / "workspace.yaml").read_text())
    assert ws["load_from"][0]["python_module"]["module_name"] == "genops_assets.definitions"


def test_dbt_project_has_no_python_package_marker():
    assert not list((REPO / "dbt").rglob("__init__.py"))
