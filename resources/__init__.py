"""Resources of genops. ``defs()`` / ``build_resources`` is the one place that reads the environment
(``resources.settings.GenopsSettings``); the resources carry the values as fields."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import dagster as dg
from dagster_dbt import DbtCliResource

from resources.automation import AutomationResource
from resources.endpoint import LocalEndpoint, VllmEndpoint
from resources.feedback_store import BigQueryFeedbackStore, DuckDBFeedbackStore, FeedbackStore
from resources.judge import JudgeResource
from resources.paths import GenopsHome
from resources.settings import REPO_ROOT, GenopsSettings
from resources.storage import GcsStorage, LocalStorage, Storage
from resources.tracking import MlflowTracking, registered_model_name
from resources.trainer import K8sTrainer, SubprocessTrainer, Trainer
from resources.warehouse import DuckDBWarehouse

DBT_PROJECT_DIR = REPO_ROOT / "dbt"

# Telemetry off and nothing fetched from a hub at run time, for every process genops starts.
QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# Set whatever the environment says: MLflow must never unpickle a model (genops logs its
# models from code and loads adapters from safetensors only).
SAFE_ENV = {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}


def genops_home() -> Path:
    return GenopsSettings.from_env().home.resolve()


def dbt_executable() -> str:
    beside = Path(sys.executable).with_name("dbt")
    return str(beside) if beside.exists() else (shutil.which("dbt") or "dbt")


def _secret(name: str, value: object, unset: str | None) -> dg.EnvVar | str | None:
    """A secret the resource reads from the environment at run time, never copied into config."""
    return dg.EnvVar(name) if value is not None else unset


def build_resources(home: Path | None = None, port: int | None = None,
                    judge_port: int | None = None, settings: GenopsSettings | None = None) -> dict:
    """Every resource, from ``settings`` (read from the environment when not given); the
    arguments override the settings of the same name."""
    settings = settings or GenopsSettings.from_env()
    home = (home or settings.home).resolve()
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.update(SAFE_ENV)
    mlflow_dir = home / "mlflow"
    mlflow_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = settings.mlflow_tracking_uri or f"sqlite:///{mlflow_dir / 'mlflow.db'}"
    artifact_root = (settings.gcs_artifact_root() if settings.profile == "gcp"
                     else settings.mlflow_artifact_root or (mlflow_dir / "artifacts").as_uri())
    warehouse = DuckDBWarehouse(path=str(home / "warehouse.duckdb"))
    return {
        "home": GenopsHome(root=str(home), background_nice=settings.background_nice),
        "warehouse": warehouse,
        "feedback_store": feedback_store_backend(warehouse, settings),
        "storage": storage_backend(home, settings),
        "mlflow": MlflowTracking(tracking_uri=tracking_uri, artifact_root=artifact_root),
        "endpoint": serving_backend(home, settings, port, tracking_uri),
        "judge": JudgeResource(
            base_url=settings.judge_base_url,
            model=settings.judge_model,
            api_key=_secret("GENOPS_JUDGE_API_KEY", settings.judge_api_key, "unused"),
            local_state_dir=str(home / "judge"),
            local_port=judge_port or settings.judge_port,
            local_nice=settings.background_nice,
            tracking_uri=tracking_uri,
        ),
        "automation": AutomationResource.from_settings(settings),
        "trainer": trainer_backend(home, settings),
        "dbt": DbtCliResource(
            project_dir=str(DBT_PROJECT_DIR),
            profiles_dir=str(DBT_PROJECT_DIR),
            dbt_executable=dbt_executable(),
        ),
    }


def serving_backend(home: Path, settings: GenopsSettings, port: int | None = None, tracking_uri: str | None = None):
    """genops' local server (one for every task, following each task's registered model in
    ``tracking_uri``), or a running vLLM server when ``GENOPS_SERVING_BACKEND=vllm``."""
    if settings.serving_backend == "vllm":
        if not settings.vllm_base_url:
            raise ValueError("GENOPS_SERVING_BACKEND=vllm needs GENOPS_VLLM_BASE_URL (the server's .../v1 URL)")
        return VllmEndpoint(
            base_url=settings.vllm_base_url,
            api_key=_secret("GENOPS_VLLM_API_KEY", settings.vllm_api_key, "unused"),
            base_model_name=settings.vllm_base_model,
            lora_path_template=settings.vllm_lora_path,
            unguarded=settings.vllm_unguarded,
        )
    return LocalEndpoint(state_dir=str(home / "endpoint"), port=port or settings.endpoint_port,
                         watch_registry=tracking_uri, watch_prefix=registered_model_name(""),
                         tasks_dir=str(settings.tasks_dir), canary_share=settings.canary_share,
                         api_keys=_secret("GENOPS_API_KEYS", settings.api_keys, ""),
                         client_api_key=_secret("GENOPS_CLIENT_API_KEY", settings.client_api_key, ""))


def storage_backend(home: Path, settings: GenopsSettings) -> Storage:
    """Published datasets, adapters and reports: under ``<home>/objects``, or in
    ``gs://GENOPS_GCS_BUCKET/GENOPS_GCS_PREFIX/`` in the gcp profile (credentials from workload
    identity or application default credentials, read by google-auth, never by genops)."""
    if settings.profile == "gcp":
        from dagster_gcp import GCSResource  # only in the cloud profile: it imports google-cloud-storage

        return GcsStorage(gcs=GCSResource(project=settings.gcp_project), bucket=settings.gcs_bucket,
                          prefix=settings.gcs_prefix)
    return LocalStorage(root=str(home / "objects"))


def trainer_backend(home: Path, settings: GenopsSettings) -> Trainer:
    """Where SFT training runs (``GENOPS_TRAINER``): a child process of the run, or a pod on
    Kubernetes (``GENOPS_K8S_TRAIN_IMAGE`` required); under ``accelerate launch`` with
    ``GENOPS_TRAIN_LAUNCHER`` and ``GENOPS_TRAIN_NUM_PROCESSES`` processes."""
    common = {"launcher": settings.train_launcher, "num_processes": settings.train_num_processes}
    if settings.trainer == "k8s":
        if not settings.k8s_train_image:
            raise ValueError("GENOPS_TRAINER=k8s needs GENOPS_K8S_TRAIN_IMAGE (the user-code image the training pod "
                             "runs)")
        trainer: Trainer = K8sTrainer(**common, namespace=settings.k8s_namespace, image=settings.k8s_train_image,
                                      gpus=settings.k8s_train_gpus, memory=settings.k8s_train_memory,
                                      home_path=str(home), home_claim=settings.k8s_home_claim,
                                      service_account=settings.k8s_service_account)
    else:
        trainer = SubprocessTrainer(**common)
    trainer.command(port=0)  # a missing launcher config, or processes without one, fail the load
    return trainer


def feedback_store_backend(warehouse: DuckDBWarehouse, settings: GenopsSettings) -> FeedbackStore:
    """Request records in the local warehouse, or in BigQuery when ``GENOPS_FEEDBACK_STORE=bigquery``
    (``GENOPS_GCP_PROJECT``, ``GENOPS_BQ_DATASET``, ``GENOPS_BQ_LOCATION``; credentials from
    application default credentials, or a base64 service-account key in ``GENOPS_GCP_CREDENTIALS``).
    Records pass the ``GENOPS_REDACTOR`` hook before either stores them."""
    if settings.feedback_store == "bigquery":
        if not settings.gcp_project:
            raise ValueError("GENOPS_FEEDBACK_STORE=bigquery needs GENOPS_GCP_PROJECT (the Google Cloud project "
                             "that holds the feedback dataset)")
        from dagster_gcp import BigQueryResource  # only in the cloud profile: it imports google-cloud-bigquery

        return BigQueryFeedbackStore(
            bigquery=BigQueryResource(project=settings.gcp_project, location=settings.bq_location,
                                      gcp_credentials=_secret("GENOPS_GCP_CREDENTIALS", settings.gcp_credentials,
                                                              None)),
            dataset=settings.bq_dataset,
            redactor=settings.redactor,
        )
    return DuckDBFeedbackStore(warehouse=warehouse, redactor=settings.redactor)


def defs() -> dg.Definitions:
    return dg.Definitions(resources=build_resources())
