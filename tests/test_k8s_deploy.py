"""Dagster on Kubernetes: the user-code image (deploy/Dockerfile.dagster), the values for the official
Dagster chart (deploy/helm/values.yaml) and the objects beside them (deploy/k8s/dagster/).

There is no helm binary here, so the instance config the chart renders from these values (run
launcher, run coordinator, run monitoring and retries, concurrency pools) is built the way the
chart's templates build it and loaded by Dagster itself into a real instance; its K8sRunLauncher
then launches a run with the Kubernetes API call intercepted, and the Job it would create is
validated against the Kubernetes schema, like every shipped manifest."""

from __future__ import annotations

import re
import shlex
from importlib.util import find_spec
from pathlib import Path
from unittest import mock

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VALUES = REPO / "deploy" / "helm" / "values.yaml"
DOCKERFILE = REPO / "deploy" / "Dockerfile.dagster"
MANIFESTS = REPO / "deploy" / "k8s" / "dagster"
K8S_VERSION = "1.33.0"
RELEASE = "genops"  # helm upgrade --install genops dagster/dagster -n genops
NAMESPACE = "genops"
GPU = "nvidia.com/gpu"


def values() -> dict:
    return yaml.safe_load(VALUES.read_text())


def manifests() -> list[tuple[str, dict]]:
    return [(f.name, d) for f in sorted(MANIFESTS.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == kind}


def user_deployment(vals: dict | None = None) -> dict:
    (dep,) = (vals or values())["dagster-user-deployments"]["deployments"]
    return dep


def image_ref(image: dict) -> str:
    return f"{image['repository']}:{image['tag']}"


def training_pod() -> dict:
    return by_kind("PodTemplate")["genops-training"]["template"]["spec"]


# -- the manifests --------------------------------------------------------------------------

@pytest.mark.parametrize("name,doc", manifests(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_every_manifest_is_valid_against_the_api_schema(name, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    if doc["kind"] != "Namespace":
        assert doc["metadata"]["namespace"] == NAMESPACE


def test_a_broken_pod_template_is_caught():
    bad = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
           "template": {"spec": {"containers": [{"name": "t", "image": "i", "resources": {"limits": {GPU: []}}}]}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


# -- the values and the objects they name ---------------------------------------------------

def test_values_and_manifests_name_the_same_image_claim_settings_and_account():
    vals, dep = values(), user_deployment()
    image = image_ref(dep["image"])
    env = dep["env"]
    train = training_pod()
    (mlflow_dep,) = by_kind("Deployment").values()
    assert env["GENOPS_K8S_TRAIN_IMAGE"] == image == train["containers"][0]["image"]
    assert mlflow_dep["spec"]["template"]["spec"]["containers"][0]["image"] == image

    # One data directory: the claim exists, the code location, the run pods (they inherit the
    # deployment's volumes) and the training pod mount it at GENOPS_HOME.
    claims = by_kind("PersistentVolumeClaim")
    (volume,) = dep["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == env["GENOPS_K8S_HOME_CLAIM"] in claims
    assert claims[env["GENOPS_K8S_HOME_CLAIM"]]["spec"]["accessModes"] == ["ReadWriteMany"]
    (mount,) = dep["volumeMounts"]
    train_mounts = {m["name"]: m["mountPath"] for m in train["containers"][0]["volumeMounts"]}
    train_claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in train["volumes"]
                    if "persistentVolumeClaim" in v}
    assert mount["mountPath"] == env["GENOPS_HOME"] == train_mounts["genops-home"] == "/data"
    assert train_claims == {"genops-home": env["GENOPS_K8S_HOME_CLAIM"]}
    assert dep["includeConfigInLaunchedRuns"]["enabled"] is True
    assert re.search(r"^\s+GENOPS_HOME=/data \\$", DOCKERFILE.read_text(), re.M)

    # Settings and secrets: the ConfigMap ships here; secrets are created by the documented
    # commands (never with values in this repository).
    assert {c["name"] for c in dep["envConfigMaps"]} <= set(by_kind("ConfigMap"))
    docs = VALUES.read_text() + (MANIFESTS / "mlflow.yaml").read_text()
    documented = set(re.findall(r"create secret generic (\S+)", docs))
    secret_refs = {s["name"] for s in dep["envSecrets"]} | {vals["global"]["postgresqlSecretName"]}
    for _, doc in manifests():
        secret_refs |= set(re.findall(r"'name': '([^']+)', 'key'", str(doc)))
        secret_refs |= set(re.findall(r"'secretName': '([^']+)'", str(doc)))
    assert secret_refs == documented == {"genops-secrets", "genops-dagster-postgres", "genops-mlflow"}
    assert not by_kind("Secret")
    assert vals["generatePostgresqlPasswordSecret"] is False and vals["postgresql"]["enabled"] is False
    assert "postgresqlPassword" not in vals["postgresql"]

    # The account the run pods run as may create the training pods.
    account = vals["global"]["serviceAccountName"]
    assert env["GENOPS_K8S_SERVICE_ACCOUNT"] == account == train["serviceAccountName"]
    (binding,) = by_kind("RoleBinding").values()
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    rules = {r: set(rule["verbs"]) for rule in by_kind("Role")[binding["roleRef"]["name"]]["rules"]
             for r in rule["resources"]}
    assert {"create", "get", "watch", "delete"} <= rules["pods"] and "get" in rules["pods/log"]


def test_mlflow_uri_points_at_the_server_the_manifests_run():
    env = user_deployment()["env"]
    host, port = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", env["GENOPS_MLFLOW_TRACKING_URI"]).groups()
    service = by_kind("Service")[host]
    assert service["spec"]["ports"][0]["port"] == int(port)
    container = by_kind("Deployment")[host]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "genops_assets.cli.mlflow_server"]
    args = container["args"]
    assert args[args.index("--port") + 1] == str(container["ports"][0]["containerPort"])
    assert "--auth" in args and f"{host}:{port}" in args[args.index("--allowed-hosts") + 1].split(",")
    assert env["GENOPS_MLFLOW_ARTIFACT_ROOT"] == "mlflow-artifacts:/genops"
    # The server's own argument parser takes these arguments.
    from genops_assets.cli.mlflow_server import parser

    parsed = parser().parse_args(args)
    assert (parsed.port, parsed.auth) == (int(port), True)


def test_gpu_pool_quota_and_training_pool_agree():
    vals, env = values(), user_deployment()["env"]
    train = training_pod()
    gpus = int(train["containers"][0]["resources"]["limits"][GPU])
    assert gpus == int(train["containers"][0]["resources"]["requests"][GPU]) == int(env["GENOPS_K8S_TRAIN_GPUS"])
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in train["tolerations"]
    # Training goes to the GPU pool; everything else stays off it.
    gpu_pool = train["nodeSelector"]["cloud.google.com/gke-nodepool"]
    pool_of = "cloud.google.com/gke-nodepool"
    cpu_pools = {vals[k]["nodeSelector"][pool_of] for k in ("dagsterWebserver", "dagsterDaemon")}
    cpu_pools.add(user_deployment()["nodeSelector"]["cloud.google.com/gke-nodepool"])
    run_pod = vals["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["podSpecConfig"]
    cpu_pools.add(run_pod["nodeSelector"]["cloud.google.com/gke-nodepool"])
    assert gpu_pool not in cpu_pools and len(cpu_pools) == 1
    # A training that holds a pool slot finds its GPU within the quota.
    limit = vals["concurrency"]["pools"]["defaultLimit"]
    (quota,) = by_kind("ResourceQuota").values()
    assert limit * gpus == int(quota["spec"]["hard"][f"requests.{GPU}"])


def test_the_training_asset_is_in_the_pool_the_values_limit():
    from genops_assets.defs.tuning import assets

    source = Path(assets.__file__).read_text()
    assert re.search(r'pool="training"', source)
    assert values()["concurrency"]["enabled"] is True


def test_the_trainer_pod_matches_the_shipped_template():
    """The pod the `k8s` trainer builds (when that trainer is part of this checkout) lands on the
    GPU pool the template describes, with its claim and image."""
    if find_spec("resources.trainer") is None:
        pytest.skip("resources/trainer.py (the Pipes trainer) is not part of this checkout")
    from resources.trainer import K8sTrainer

    env, train = user_deployment()["env"], training_pod()
    trainer = K8sTrainer(namespace=env["GENOPS_K8S_NAMESPACE"], image=env["GENOPS_K8S_TRAIN_IMAGE"],
                         gpus=int(env["GENOPS_K8S_TRAIN_GPUS"]), home_path=env["GENOPS_HOME"],
                         home_claim=env["GENOPS_K8S_HOME_CLAIM"], service_account=env["GENOPS_K8S_SERVICE_ACCOUNT"],
                         node_selector=train["nodeSelector"])
    spec = trainer.pod_spec()
    assert spec["containers"][0]["image"] == train["containers"][0]["image"]
    assert spec["containers"][0]["resources"]["limits"][GPU] == train["containers"][0]["resources"]["limits"][GPU]
    assert spec["tolerations"] == train["tolerations"] and spec["node_selector"] == train["nodeSelector"]
    assert spec["volumes"][0]["persistent_volume_claim"]["claim_name"] == env["GENOPS_K8S_HOME_CLAIM"]
    assert spec["service_account_name"] == train["serviceAccountName"]


# -- the instance config the chart renders, loaded by Dagster --------------------------------

def _names(refs: list[dict]) -> list[str]:
    return [r["name"] for r in refs or [] if "name" in r]


def rendered_instance(vals: dict) -> dict:
    """The dagster.yaml the chart writes into its instance ConfigMap for ``vals`` (the parts
    these values set: run launcher, run coordinator, run monitoring, run retries, concurrency,
    telemetry, Postgres storages)."""
    g, launcher = vals["global"], vals["runLauncher"]["config"]["k8sRunLauncher"]
    cfg = {
        "load_incluster_config": launcher["loadInclusterConfig"],
        "job_namespace": launcher.get("jobNamespace") or NAMESPACE,
        "image_pull_policy": launcher["imagePullPolicy"],
        "service_account_name": g["serviceAccountName"],
        "dagster_home": g["dagsterHome"],
        "instance_config_map": f"{RELEASE}-dagster-instance",
        "postgres_password_secret": g["postgresqlSecretName"],
    }
    for key, snake in (("envConfigMaps", "env_config_maps"), ("envSecrets", "env_secrets")):
        if launcher.get(key):
            cfg[snake] = _names(launcher[key])
    for key, snake in (("envVars", "env_vars"), ("volumeMounts", "volume_mounts"), ("volumes", "volumes"),
                       ("labels", "labels"), ("resources", "resources"), ("schedulerName", "scheduler_name"),
                       ("securityContext", "security_context")):
        if launcher.get(key):
            cfg[snake] = launcher[key]
    if launcher.get("failPodOnRunFailure"):
        cfg["fail_pod_on_run_failure"] = True
    if launcher.get("runK8sConfig"):
        cfg["run_k8s_config"] = {re.sub(r"([A-Z])", r"_\1", k).lower(): v for k, v in launcher["runK8sConfig"].items()}
    pg = vals["postgresql"]
    storage = {"postgres_db": {"username": pg["postgresqlUsername"], "password": {"env": "DAGSTER_PG_PASSWORD"},
                               "hostname": pg["postgresqlHost"], "db_name": pg["postgresqlDatabase"],
                               "port": pg["service"]["port"], "params": pg["postgresqlParams"]}}
    daemon = vals["dagsterDaemon"]
    monitoring, retries = daemon["runMonitoring"], daemon["runRetries"]
    concurrency = vals["concurrency"]
    pools = {"default_limit": concurrency["pools"]["defaultLimit"], "granularity": concurrency["pools"]["granularity"]}
    return {
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": cfg},
        "run_storage": {"module": "dagster_postgres.run_storage", "class": "PostgresRunStorage", "config": storage},
        "event_log_storage": {"module": "dagster_postgres.event_log", "class": "PostgresEventLogStorage",
                              "config": storage},
        "schedule_storage": {"module": "dagster_postgres.schedule_storage", "class": "PostgresScheduleStorage",
                             "config": storage},
        "run_coordinator": {"module": "dagster.core.run_coordinator", "class": daemon["runCoordinator"]["type"],
                            "config": {}},
        "run_monitoring": {"enabled": monitoring["enabled"],
                           "start_timeout_seconds": monitoring["startTimeoutSeconds"],
                           "max_resume_run_attempts": monitoring["maxResumeRunAttempts"],
                           "poll_interval_seconds": monitoring["pollIntervalSeconds"],
                           "free_slots_after_run_end_seconds": monitoring["freeSlotsAfterRunEndSeconds"]},
        "run_retries": {"enabled": retries["enabled"], "max_retries": retries["maxRetries"],
                        "retry_on_asset_or_op_failure": retries["retryOnAssetOrOpFailure"]},
        "concurrency": {"pools": pools, "runs": {"max_concurrent_runs": concurrency["runs"]["maxConcurrentRuns"]}},
        "telemetry": {"enabled": vals["telemetry"]["enabled"]},
    }


def test_the_rendered_instance_config_is_accepted_by_dagster():
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config_schema
    from dagster_k8s import K8sRunLauncher

    instance = rendered_instance(values())
    result = process_config(dagster_instance_config_schema(), instance)
    assert result.success, result.errors
    launcher = process_config(K8sRunLauncher.config_type(), instance["run_launcher"]["config"])
    assert launcher.success, launcher.errors
    assert instance["run_retries"]["retry_on_asset_or_op_failure"] is False
    assert instance["concurrency"]["pools"] == {"default_limit": 2, "granularity": "op"}

    broken = rendered_instance(values())
    broken["run_monitoring"]["max_resume_run_attempts"] = "twice"
    assert not process_config(dagster_instance_config_schema(), broken).success
    bad_launcher = {**instance["run_launcher"]["config"], "job_namespaces": "genops"}
    assert not process_config(K8sRunLauncher.config_type(), bad_launcher).success


def chart_container_context(dep: dict) -> dict:
    """What the chart hands the runs of a user deployment with includeConfigInLaunchedRuns:
    its namespace, account, image pull policy, environment, env sources, volumes and labels."""
    return {"k8s": {
        "namespace": NAMESPACE,
        "service_account_name": values()["global"]["serviceAccountName"],
        "image_pull_policy": dep["image"]["pullPolicy"],
        "env_config_maps": [f"{RELEASE}-dagster-user-deployments-{dep['name']}-user-env",
                            *_names(dep["envConfigMaps"])],
        "env_secrets": _names(dep["envSecrets"]),
        "env": [{"name": k, "value": v} for k, v in dep["env"].items()],
        "volumes": dep["volumes"],
        "volume_mounts": dep["volumeMounts"],
        "labels": dep.get("labels", {}),
        "run_k8s_config": {"pod_spec_config": {"security_context": dep["podSecurityContext"]}},
    }}


def test_a_continuous_training_run_becomes_a_valid_kubernetes_job(tmp_path):
    """Dagster loads the rendered instance (storages swapped for SQLite, the cluster for a
    kubeconfig that is never contacted), and its K8sRunLauncher launches a run of the
    continuous-training job from the code location's origin; the Job it sends to the API is
    checked against the Kubernetes schema and the values."""
    import kubernetes
    from dagster import DagsterInstance
    from dagster._core.code_pointer import ModuleCodePointer
    from dagster._core.launcher import LaunchRunContext
    from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
    from dagster._core.storage.dagster_run import DagsterRun
    from dagster._core.test_utils import create_run_for_test

    vals, dep = values(), user_deployment()
    config = rendered_instance(vals)
    for key in ("run_storage", "event_log_storage", "schedule_storage"):
        del config[key]  # dagster-postgres lives in the image, not in this environment
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "never-used"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    config["run_launcher"]["config"].update(load_incluster_config=False, kubeconfig_file=str(kubeconfig))
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))

    instance = DagsterInstance.from_config(str(home))
    try:
        assert type(instance.run_launcher).__name__ == "K8sRunLauncher"
        assert instance.run_launcher.supports_resume_run and instance.run_monitoring_enabled
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 2

        grpc_args = dep["dagsterApiGrpcArgs"]
        module = grpc_args[grpc_args.index("-m") + 1]
        origin = JobPythonOrigin("support_triage_continuous_training", RepositoryPythonOrigin(
            executable_path="/usr/local/bin/python", code_pointer=ModuleCodePointer(module, "defs", "/app"),
            container_image=image_ref(dep["image"]), container_context=chart_container_context(dep)))
        run = create_run_for_test(instance, job_name=origin.job_name, job_code_origin=origin)
        assert isinstance(run, DagsterRun)
        with mock.patch.object(kubernetes.client.BatchV1Api, "create_namespaced_job") as create:
            instance.run_launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
        body, namespace = create.call_args.kwargs["body"], create.call_args.kwargs["namespace"]
    finally:
        instance.dispose()

    job = kubernetes.client.ApiClient().sanitize_for_serialization(body)
    job["apiVersion"], job["kind"] = "batch/v1", "Job"
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    assert namespace == NAMESPACE
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["ttlSecondsAfterFinished"] == 86400
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == image_ref(dep["image"])
    assert container["args"][:5] == ["/usr/local/bin/python", "-m", "dagster", "api", "execute_run"]
    assert pod["serviceAccountName"] == vals["global"]["serviceAccountName"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-nodepool": "genops-cpu"}
    assert pod["securityContext"] == {"fsGroup": 10001}
    assert GPU not in str(pod)  # the run pod itself never holds a GPU
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["GENOPS_TRAINER"] == "k8s" and env["GENOPS_HOME"] == "/data" and env["DAGSTER_HOME"]
    from_refs = [(("configMap" if "configMapRef" in s else "secret"), (s.get("configMapRef") or s["secretRef"])["name"])
                 for s in container["envFrom"]]
    assert ("configMap", "genops-settings") in from_refs and ("secret", "genops-secrets") in from_refs
    assert {"name": "genops-home", "persistentVolumeClaim": {"claimName": "genops-home"}} in pod["volumes"]
    assert {"name": "genops-home", "mountPath": "/data"} in container["volumeMounts"]
    assert container["resources"]["requests"] == {"cpu": "2", "memory": "8Gi"}


# -- the image ------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [tuple(ln.split(None, 1)) for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_the_image_copies_what_exists_and_serves_the_code_location():
    steps = dockerfile_instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    for op, arg in steps:
        if op == "COPY":
            *sources, _ = shlex.split(arg)
            for src in sources:
                assert (REPO / src).exists(), f"Dockerfile.dagster copies {src}, which does not exist"
    copied = {s for op, arg in steps if op == "COPY" for s in shlex.split(arg)[:-1]}
    # Everything the code location reads at load time: package code, dbt project, task folders.
    assert {"genops_assets", "resources", "sensors", "dbt", "tasks", "workspace.yaml"} <= copied
    run = " ".join(arg for op, arg in steps if op == "RUN")
    assert "dbt parse" in run and "target/manifest.json" in run
    import dagster_k8s

    assert f"dagster-k8s=={dagster_k8s.__version__}" in run and f"dagster-postgres=={dagster_k8s.__version__}" in run

    workspace = yaml.safe_load((REPO / "workspace.yaml").read_text())["load_from"][0]["python_module"]
    dep = user_deployment()
    assert dep["name"] == workspace["location_name"]
    assert dep["dagsterApiGrpcArgs"] == ["-m", workspace["module_name"]]
    cmd = yaml.safe_load(next(arg for op, arg in steps if op == "CMD"))
    assert cmd[:3] == ["dagster", "api", "grpc"] and cmd[cmd.index("-m") + 1] == workspace["module_name"]
    assert cmd[cmd.index("-p") + 1] == str(dep["port"]) == next(arg for op, arg in steps if op == "EXPOSE")
    assert ("USER", "genops") in steps
    env = next(arg for op, arg in steps if op == "ENV")
    assert f"DAGSTER_HOME={values()['global']['dagsterHome']}" in env
    # The server image stays what it is.
    assert 'CMD ["genops", "serve"' in (REPO / "deploy" / "Dockerfile").read_text()
