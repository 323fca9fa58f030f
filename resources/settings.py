"""The environment genops' code location reads: every ``GENOPS_*`` setting, typed, in one object.

``resources/__init__.py`` reads it once (``GenopsSettings.from_env``) when the definitions load
and hands the values to the resources it builds; sensors and assets get them from those
resources. A change takes effect when the code location reloads. An empty variable counts as
unset; a malformed one fails the load with a message naming the variable.

Secrets (``*_API_KEY``, ``GENOPS_API_KEYS``, ``GENOPS_GCP_CREDENTIALS``; MLflow's own
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, which MLflow reads itself) are only checked for
presence here: resources bind them with ``dg.EnvVar``, so their values never enter run config.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_PREFIX = "GENOPS_"
DEFAULT_LABEL_THRESHOLD = 10
DEFAULT_BACKGROUND_NICE = 10


class SettingsError(ValueError):
    """A ``GENOPS_*`` variable holds a value genops cannot use; the message names it."""


class GenopsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore",
                                      str_strip_whitespace=True, frozen=True)

    # where state and tasks live
    home: Path = Field(REPO_ROOT / ".genops", description="The data directory: every piece of local state")
    task: str = Field("support_triage", description="The task folder the graph works on")
    tasks_dir: Path = Field(REPO_ROOT / "tasks", description="Folder of task folders")
    mlflow_tracking_uri: str | None = Field(None, description="Unset: SQLite under <home>/mlflow")
    mlflow_artifact_root: str | None = Field(None, description="Unset: <home>/mlflow/artifacts")

    # serving
    serving_backend: Literal["local", "vllm"] = "local"
    endpoint_port: int = Field(8008, ge=1, le=65535, description="Port of the local endpoint")
    canary_share: float = Field(0.0, ge=0, le=1, description="Share of champion requests answered by challenger")
    api_keys: SecretStr | None = Field(None, description="Keys the endpoint accepts (comma-separated), each a key "
                                       "or sha256:<hex digest of it> (genops keys new)")
    client_api_key: SecretStr | None = Field(None, description="The key genops' own requests to the endpoint send "
                                             "(default: the first key of api_keys given in plain)")
    vllm_base_url: str | None = Field(None, description="A vLLM server's .../v1 URL (serving_backend vllm)")
    vllm_api_key: SecretStr | None = None
    vllm_base_model: str | None = Field(None, description="Model id the vLLM server serves as the base")
    vllm_lora_path: str = Field("{adapter_dir}", description="Adapter path as the vLLM server sees it")
    vllm_unguarded: bool = Field(False, description="Deploy to vLLM although it runs without genops' guardrails "
                                                    "(put a guardrail gateway in front of it)")

    # judge
    judge_base_url: str | None = Field(None, description="Unset: genops' local judge server on the base model")
    judge_model: str = "base"
    judge_api_key: SecretStr | None = None
    judge_port: int = Field(8018, ge=1, le=65535, description="Port of the local judge server")

    # feedback store
    feedback_store: Literal["duckdb", "bigquery"] = "duckdb"
    gcp_project: str | None = None
    bq_dataset: str = "genops_feedback"
    bq_location: str | None = None
    gcp_credentials: SecretStr | None = Field(None, description="Base64 service-account key; unset: ADC")
    redactor: str | None = Field(None, description="module:function applied to request records before storage")

    # automation
    feedback_min_labels: int = Field(DEFAULT_LABEL_THRESHOLD, ge=1,
                                     description="New valid labelled rows that trigger retraining")
    drift_action: Literal["retrain", "alert"] = "retrain"
    auto_rollback: bool = Field(False, description="Move champion back when online quality regresses")
    alert_webhook: str | None = Field(None, description="URL that receives each alert as a JSON POST")
    alert_webhook_timeout: float = Field(5.0, gt=0, description="Seconds before a webhook POST gives up")
    ct_run_config: str | None = Field(None, description="YAML run config of every sensor-started retrain")
    background_nice: int = Field(DEFAULT_BACKGROUND_NICE, ge=0, le=19,
                                 description="CPU nice of background work beside the endpoint (0: unchanged)")

    # training (out of process)
    trainer: Literal["subprocess", "k8s"] = Field("subprocess", description="Where SFT training runs: a child "
                                                  "process of the run, or a Kubernetes pod (both via Dagster Pipes)")
    train_launcher: str | None = Field(None, description="accelerate config file (a name under deploy/accelerate/, "
                                       "relative to the repository, or absolute); unset: one plain process")
    train_num_processes: int = Field(1, ge=1, description="Training processes under the launcher (one per GPU)")
    k8s_namespace: str = Field("genops", description="Namespace of the training pods")
    k8s_train_image: str | None = Field(None, description="Image of the training pods (the user-code image)")
    k8s_train_gpus: int = Field(1, ge=0, description="GPUs each training pod asks for (0: a CPU pod)")
    k8s_train_memory: str | None = Field(None, description="Memory request and limit of a training pod, e.g. 64Gi")
    k8s_home_claim: str = Field("genops-home", description="PersistentVolumeClaim holding the data directory, "
                                "mounted in the training pod where the code location sees it")
    k8s_service_account: str | None = Field(None, description="Service account of the training pods")

    # profile
    # local: every piece of state under home. gcp: datasets, adapters and reports in a GCS bucket,
    # request records in BigQuery, MLflow on a tracking server (Postgres, artifacts in GCS),
    # the endpoint on vLLM (GKE) and training as Kubernetes jobs. In gcp the defaults of
    # feedback_store, serving_backend and trainer change; a variable set explicitly still wins.
    # Credentials: workload identity / application default credentials, or GENOPS_GCP_CREDENTIALS
    # bound as dg.EnvVar; no key is ever a setting's value.
    profile: Literal["local", "gcp"] = Field("local", description="local | gcp: which engines genops runs on")
    gcs_bucket: str | None = Field(None, description="Bucket of datasets, adapters and reports (required in gcp)")
    gcs_prefix: str = Field("genops", description="Key prefix of everything genops writes to the bucket")
    # What GENOPS_PROFILE=gcp changes unless set explicitly, and what it cannot do without.
    GCP_DEFAULTS: ClassVar[dict[str, str]] = {"feedback_store": "bigquery", "serving_backend": "vllm",
                                              "trainer": "k8s"}
    GCP_REQUIRED: ClassVar[dict[str, str]] = {
        "gcs_bucket": "the bucket of datasets, adapters and reports",
        "gcp_project": "the Google Cloud project of the bucket and the BigQuery dataset",
        "mlflow_tracking_uri": "the MLflow tracking server's URL"}

    @field_validator("profile", mode="before")
    @classmethod
    def _profile_name(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _profile_defaults(cls, data: object) -> object:
        if not isinstance(data, dict) or str(data.get("profile", "")).strip().lower() != "gcp":
            return data
        return {**cls.GCP_DEFAULTS, **data}

    @model_validator(mode="after")
    def _profile_requirements(self) -> GenopsSettings:
        if self.profile != "gcp":
            return self
        missing = [f"{ENV_PREFIX}{name.upper()} ({why})" for name, why in self.GCP_REQUIRED.items()
                   if not getattr(self, name)]
        if self.trainer == "k8s" and not self.k8s_train_image:
            missing.append(f"{ENV_PREFIX}K8S_TRAIN_IMAGE (the image of the training pods; or {ENV_PREFIX}TRAINER="
                           "subprocess)")
        if missing:
            raise ValueError(f"{ENV_PREFIX}PROFILE=gcp needs " + ", ".join(missing))
        if not self.mlflow_tracking_uri.startswith(("http://", "https://")):
            raise ValueError(f"{ENV_PREFIX}PROFILE=gcp needs {ENV_PREFIX}MLFLOW_TRACKING_URI to be the tracking "
                             f"server's http(s):// URL, got {self.mlflow_tracking_uri!r}")
        if self.mlflow_artifact_root and not self.mlflow_artifact_root.startswith("gs://"):
            raise ValueError(f"{ENV_PREFIX}PROFILE=gcp keeps MLflow artifacts in GCS: {ENV_PREFIX}MLFLOW_ARTIFACT_ROOT "
                             f"must be a gs:// URI (unset: gs://<bucket>/<prefix>/mlflow), "
                             f"got {self.mlflow_artifact_root!r}")
        if "/" in self.gcs_bucket or self.gcs_bucket.startswith("gs:"):
            raise ValueError(f"{ENV_PREFIX}GCS_BUCKET must be a bucket name (no gs://, no path; the path is "
                             f"{ENV_PREFIX}GCS_PREFIX), got {self.gcs_bucket!r}")
        return self

    def gcs_artifact_root(self) -> str:
        """Where MLflow keeps artifacts in the gcp profile: the setting, else under the bucket."""
        return self.mlflow_artifact_root or f"gs://{self.gcs_bucket}/{self.gcs_prefix.strip('/')}/mlflow"

    @field_validator("drift_action", "serving_backend", "feedback_store", "trainer", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @classmethod
    def from_env(cls) -> GenopsSettings:
        """The settings from the environment; a bad value raises :class:`SettingsError` naming it."""
        try:
            return cls()
        except ValidationError as exc:
            raise SettingsError(describe(exc)) from exc


def describe(exc: ValidationError) -> str:
    """``GENOPS_X must be ..., got '...'`` for each bad variable."""
    lines = []
    for err in exc.errors(include_url=False):
        if not err["loc"]:  # a rule across variables: its message names them
            lines.append(err["msg"].removeprefix("Value error, "))
            continue
        name = ENV_PREFIX + "_".join(str(part) for part in err["loc"]).upper()
        rule = err["msg"].removeprefix("Input should be ")
        lines.append(f"{name} must be {rule}, got {err['input']!r}")
    return "; ".join(lines)
