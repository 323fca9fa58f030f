"""Resources of genops. ``defs()`` is the one place that reads the environment."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import dagster as dg
from dagster_dbt import DbtCliResource

from resources.endpoint import LocalEndpoint, VllmEndpoint
from resources.feedback_store import BigQueryFeedbackStore, DuckDBFeedbackStore, FeedbackStore
from resources.judge import JudgeResource
from resources.paths import GenopsHome
from resources.task import TaskResource
from resources.tracking import MlflowTracking
from resources.warehouse import DuckDBWarehouse

REPO_ROOT = Path(__file__).resolve().parents[1]
DBT_PROJECT_DIR = REPO_ROOT / "dbt"

# Telemetry off and nothing fetched from a hub at run time, for every process genops starts.
QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "RAGAS_DO_NOT_TRACK": "true",
    "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def genops_home() -> Path:
    return Path(os.environ.get("GENOPS_HOME") or REPO_ROOT / ".genops").resolve()


def dbt_executable() -> str:
    beside = Path(sys.executable).with_name("dbt")
    return str(beside) if beside.exists() else (shutil.which("dbt") or "dbt")


def build_resources(home: Path | None = None, task: str | None = None, port: int | None = None,
                    judge_port: int | None = None) -> dict:
    home = (home or genops_home()).resolve()
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    mlflow_dir = home / "mlflow"
    mlflow_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = os.environ.get("GENOPS_MLFLOW_TRACKING_URI") or f"sqlite:///{mlflow_dir / 'mlflow.db'}"
    artifact_root = os.environ.get("GENOPS_MLFLOW_ARTIFACT_ROOT") or (mlflow_dir / "artifacts").as_uri()
    task_name = task or os.environ.get("GENOPS_TASK") or "support_triage"
    warehouse = DuckDBWarehouse(path=str(home / "warehouse.duckdb"))
    return {
        "home": GenopsHome(root=str(home)),
        "task": TaskResource(
            tasks_dir=os.environ.get("GENOPS_TASKS_DIR") or str(REPO_ROOT / "tasks"),
            name=task_name,
        ),
        "warehouse": warehouse,
        "feedback_store": feedback_store_backend(warehouse),
        "mlflow": MlflowTracking(tracking_uri=tracking_uri, artifact_root=artifact_root),
        "endpoint": serving_backend(home, port, tracking_uri, f"genops-{task_name}"),
        "judge": JudgeResource(
            base_url=os.environ.get("GENOPS_JUDGE_BASE_URL") or None,
            model=os.environ.get("GENOPS_JUDGE_MODEL") or "base",
            api_key=dg.EnvVar("GENOPS_JUDGE_API_KEY") if os.environ.get("GENOPS_JUDGE_API_KEY") else "unused",
            local_state_dir=str(home / "judge"),
            local_port=judge_port or int(os.environ.get("GENOPS_JUDGE_PORT") or 8018),
        ),
        "dbt": DbtCliResource(
            project_dir=str(DBT_PROJECT_DIR),
            profiles_dir=str(DBT_PROJECT_DIR),
            dbt_executable=dbt_executable(),
        ),
    }


def serving_backend(home: Path, port: int | None = None, tracking_uri: str | None = None,
                    model_name: str | None = None):
    """genops' local server, or a running vLLM server when ``GENOPS_SERVING_BACKEND=vllm``."""
    backend = os.environ.get("GENOPS_SERVING_BACKEND", "local")
    if backend == "vllm":
        url = os.environ.get("GENOPS_VLLM_BASE_URL")
        if not url:
            raise ValueError("GENOPS_SERVING_BACKEND=vllm needs GENOPS_VLLM_BASE_URL (the server's .../v1 URL)")
        return VllmEndpoint(
            base_url=url,
            api_key=dg.EnvVar("GENOPS_VLLM_API_KEY") if os.environ.get("GENOPS_VLLM_API_KEY") else "unused",
            base_model_name=os.environ.get("GENOPS_VLLM_BASE_MODEL") or None,
            lora_path_template=os.environ.get("GENOPS_VLLM_LORA_PATH") or "{adapter_dir}",
        )
    if backend != "local":
        raise ValueError(f"GENOPS_SERVING_BACKEND must be 'local' or 'vllm', got {backend!r}")
    return LocalEndpoint(state_dir=str(home / "endpoint"), port=port or int(os.environ.get("GENOPS_ENDPOINT_PORT") or 8008),
                         watch_registry=tracking_uri, watch_model=model_name,
                         canary_share=float(os.environ.get("GENOPS_CANARY_SHARE") or 0.0))


def feedback_store_backend(warehouse: DuckDBWarehouse) -> FeedbackStore:
    """Request records in the local warehouse, or in BigQuery when ``GENOPS_FEEDBACK_STORE=bigquery``
    (``GENOPS_GCP_PROJECT``, ``GENOPS_BQ_DATASET``, ``GENOPS_BQ_LOCATION``; credentials from
    application default credentials, or a base64 service-account key in ``GENOPS_GCP_CREDENTIALS``)."""
    store = os.environ.get("GENOPS_FEEDBACK_STORE", "duckdb")
    if store == "bigquery":
        project = os.environ.get("GENOPS_GCP_PROJECT")
        if not project:
            raise ValueError("GENOPS_FEEDBACK_STORE=bigquery needs GENOPS_GCP_PROJECT (the Google Cloud project "
                             "that holds the feedback dataset)")
        from dagster_gcp import BigQueryResource  # only in the cloud profile: it imports google-cloud-bigquery

        key = dg.EnvVar("GENOPS_GCP_CREDENTIALS") if os.environ.get("GENOPS_GCP_CREDENTIALS") else None
        return BigQueryFeedbackStore(
            bigquery=BigQueryResource(project=project, location=os.environ.get("GENOPS_BQ_LOCATION") or None,
                                      gcp_credentials=key),
            dataset=os.environ.get("GENOPS_BQ_DATASET") or "genops_feedback",
        )
    if store != "duckdb":
        raise ValueError(f"GENOPS_FEEDBACK_STORE must be 'duckdb' or 'bigquery', got {store!r}")
    return DuckDBFeedbackStore(warehouse=warehouse)


def defs() -> dg.Definitions:
    return dg.Definitions(resources=build_resources())
