"""The profile setting: GENOPS_PROFILE=local|gcp changes which engines genops runs on by
configuration alone.

- Definitions load under each profile (in a fresh process, as a code location loads) and bind
  the resource classes of that profile; secrets stay environment variables.
- The object store keeps its contract on both backends: the local folder, and GCS through
  dagster-gcp's GCSResource against gcp-storage-emulator (a GCS emulator from PyPI, started
  in-process on a local port; google-cloud-storage talks to it through STORAGE_EMULATOR_HOST).
- BigQuery has no emulator that installs here: the reads the monitoring assets and the label
  join send are contract tests through ``FakeBigQuery`` (tests/bigquery_fake.py), a fake at the
  client boundary that executes only the SQL it knows with BigQuery's meaning. Each read is
  checked against the same read of the local DuckDB store holding the same records.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
from bigquery_fake import REQUESTS, fake_bigquery, fake_store
from test_qlora import tuning_res  # noqa: F401  (fixture: the tuning asset's resources)

from genops_assets.defs.datasets.assets import build_raw_examples
from genops_assets.defs.feedback.assets import request_log
from genops_assets.lib.feedback import COLUMNS, read_new_records
from genops_assets.lib.integrity import MANIFEST, files_digest, read_manifest, write_manifest
from genops_assets.lib.tasks import TaskRef
from resources import build_resources
from resources.feedback_store import DuckDBFeedbackStore, RequestQuery
from resources.paths import GenopsHome
from resources.settings import GenopsSettings, SettingsError
from resources.storage import GcsStorage, LocalStorage, StorageError
from resources.warehouse import DuckDBWarehouse

REPO = Path(__file__).resolve().parents[1]
PORTS = range(19700, 19750)
BUCKET = "genops-test-bucket"
GCP_ENV = {"GENOPS_PROFILE": "gcp", "GENOPS_GCS_BUCKET": BUCKET, "GENOPS_GCP_PROJECT": "genops-test",
           "GENOPS_MLFLOW_TRACKING_URI": "http://127.0.0.1:19749", "GENOPS_VLLM_BASE_URL": "http://127.0.0.1:19748/v1",
           "GENOPS_K8S_TRAIN_IMAGE": "registry.example/genops-dagster:test"}
SECRETS = {"GENOPS_GCP_CREDENTIALS": "c2VjcmV0LWtleS1ieXRlcw==", "GENOPS_VLLM_API_KEY": "vllm-secret-value"}


@pytest.fixture(autouse=True)
def no_genops_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("GENOPS_"):
            monkeypatch.delenv(name)


def free_port() -> int:
    for port in PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORTS}")


# -- settings ------------------------------------------------------------------------------------


def test_gcp_without_its_variables_names_each_of_them(monkeypatch):
    monkeypatch.setenv("GENOPS_PROFILE", "gcp")
    with pytest.raises(SettingsError) as err:
        GenopsSettings.from_env()
    message = str(err.value)
    assert message.startswith("GENOPS_PROFILE=gcp needs ")
    for name in ("GENOPS_GCS_BUCKET", "GENOPS_GCP_PROJECT", "GENOPS_MLFLOW_TRACKING_URI", "GENOPS_K8S_TRAIN_IMAGE"):
        assert name in message
    monkeypatch.setenv("GENOPS_PROFILE", "cloud")
    with pytest.raises(SettingsError, match="GENOPS_PROFILE must be 'local' or 'gcp', got 'cloud'"):
        GenopsSettings.from_env()


@pytest.mark.parametrize(("name", "value", "says"), [
    ("GENOPS_MLFLOW_ARTIFACT_ROOT", "/tmp/artifacts", "GENOPS_MLFLOW_ARTIFACT_ROOT must be a gs:// URI"),
    ("GENOPS_MLFLOW_TRACKING_URI", "sqlite:///mlflow.db", "GENOPS_MLFLOW_TRACKING_URI to be the tracking server's"),
    ("GENOPS_GCS_BUCKET", "gs://bucket/path", "GENOPS_GCS_BUCKET must be a bucket name"),
])
def test_gcp_refuses_local_stand_ins(monkeypatch, name, value, says):
    for k, v in {**GCP_ENV, name: value}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError, match=says):
        GenopsSettings.from_env()


def test_gcp_changes_defaults_and_explicit_variables_still_win(monkeypatch):
    for k, v in GCP_ENV.items():
        monkeypatch.setenv(k, v)
    s = GenopsSettings.from_env()
    assert (s.profile, s.feedback_store, s.serving_backend) == ("gcp", "bigquery", "vllm")
    assert s.gcs_artifact_root() == f"gs://{BUCKET}/genops/mlflow"
    assert s.trainer == "k8s"
    monkeypatch.setenv("GENOPS_FEEDBACK_STORE", "duckdb")
    monkeypatch.setenv("GENOPS_MLFLOW_ARTIFACT_ROOT", "gs://other/artifacts")
    s = GenopsSettings.from_env()
    assert s.feedback_store == "duckdb" and s.gcs_artifact_root() == "gs://other/artifacts"
    monkeypatch.setenv("GENOPS_PROFILE", "local")
    assert GenopsSettings.from_env().serving_backend == "local"


def test_a_settings_dump_shows_no_credential(monkeypatch):
    for k, v in {**GCP_ENV, **SECRETS}.items():
        monkeypatch.setenv(k, v)
    dump = json.dumps(GenopsSettings.from_env().model_dump(mode="json"))
    assert BUCKET in dump and not [v for v in SECRETS.values() if v in dump]


# -- definitions under each profile --------------------------------------------------------------

LOAD = """
import json, sys
import dagster as dg
from genops_assets.definitions import defs
res = defs.resources
out = {k: type(v).__name__ for k, v in res.items()}
out["_mlflow"] = [res["mlflow"].tracking_uri, res["mlflow"].artifact_root]
out["_storage_root"] = res["storage"].uri("x")
out["_config"] = json.dumps({k: v._get_non_default_public_field_values() if isinstance(v, dg.ConfigurableResource)
                             else None for k, v in res.items()}, default=repr)
out["_assets"] = len(list(defs.resolve_asset_graph().get_all_asset_keys()))
print(json.dumps(out))
"""


def load_definitions(tmp_path: Path, env: dict[str, str]) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GENOPS_")}
    full = {**base, "GENOPS_HOME": str(tmp_path / "home"), "DAGSTER_HOME": str(tmp_path / "dh"), **env}
    (tmp_path / "dh").mkdir(parents=True, exist_ok=True)
    out = subprocess.run([sys.executable, "-c", LOAD], cwd=REPO, env=full, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.server
def test_definitions_load_under_each_profile_with_its_resources(tmp_path):
    local = load_definitions(tmp_path / "local", {})
    gcp = load_definitions(tmp_path / "gcp", {**GCP_ENV, **SECRETS})
    assert local["_assets"] == gcp["_assets"] > 0  # the same graph: only resources differ
    assert {k: local[k] for k in ("storage", "feedback_store", "endpoint", "mlflow")} == {
        "storage": "LocalStorage", "feedback_store": "DuckDBFeedbackStore", "endpoint": "LocalEndpoint",
        "mlflow": "MlflowTracking"}
    assert {k: gcp[k] for k in ("storage", "feedback_store", "endpoint", "mlflow")} == {
        "storage": "GcsStorage", "feedback_store": "BigQueryFeedbackStore", "endpoint": "VllmEndpoint",
        "mlflow": "MlflowTracking"}
    assert local["_mlflow"][0].startswith("sqlite:///") and local["_storage_root"].startswith("file://")
    assert gcp["_mlflow"] == [GCP_ENV["GENOPS_MLFLOW_TRACKING_URI"], f"gs://{BUCKET}/genops/mlflow"]
    assert gcp["_storage_root"] == f"gs://{BUCKET}/genops/x"
    assert (local["trainer"], gcp["trainer"]) == ("SubprocessTrainer", "K8sTrainer")
    # Credentials are bound as environment variables: no value reaches the resources' config.
    for secret in SECRETS.values():
        assert secret not in gcp["_config"]
    assert "GENOPS_GCP_CREDENTIALS" in gcp["_config"] and "GENOPS_VLLM_API_KEY" in gcp["_config"]


def test_build_resources_switches_with_the_profile_alone(tmp_path, monkeypatch):
    local = build_resources(home=tmp_path)
    assert isinstance(local["storage"], LocalStorage) and local["storage"].root == str(tmp_path / "objects")
    for k, v in GCP_ENV.items():
        monkeypatch.setenv(k, v)
    gcp = build_resources(home=tmp_path)
    assert isinstance(gcp["storage"], GcsStorage)
    assert (gcp["storage"].bucket, gcp["storage"].prefix) == (BUCKET, "genops")
    assert gcp["feedback_store"].bigquery.project == "genops-test"
    assert gcp["mlflow"].artifact_root == f"gs://{BUCKET}/genops/mlflow"


# -- the object store, on the local folder and on the GCS emulator -------------------------------


@pytest.fixture(scope="module")
def gcs_emulator():
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    before = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        server.stop()
        if before is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = before


@pytest.fixture(params=["local", "gcs"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStorage(root=str(tmp_path / "objects"))
    request.getfixturevalue("gcs_emulator")
    from dagster_gcp import GCSResource

    return GcsStorage(gcs=GCSResource(project="genops-test"), bucket=BUCKET, prefix=f"t-{tmp_path.name}")


def overwrite(store, uri: str, data: bytes) -> None:
    """Change an object behind the store's back (as a bucket writer or a bad disk would)."""
    if isinstance(store, LocalStorage):
        Path(uri.removeprefix("file://")).write_bytes(data)
    else:
        name = uri.removeprefix(f"gs://{store.bucket}/")
        store.gcs.get_client().bucket(store.bucket).blob(name).upload_from_string(data)


def adapter_folder(root: Path) -> Path:
    """A LoRA adapter as genops writes one: safetensors weights, config, a nested file, a manifest."""
    import numpy as np
    from safetensors.numpy import save_file

    root.mkdir(parents=True)
    save_file({"lora_A": np.arange(12, dtype=np.float32).reshape(3, 4)}, str(root / "adapter_model.safetensors"))
    (root / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    write_manifest(root)
    return root


def test_an_adapter_folder_round_trips_with_its_digests(store, tmp_path):
    src = adapter_folder(tmp_path / "adapter")
    uri = store.upload_dir(src, "adapters/support_triage/v1")
    assert uri == store.uri("adapters/support_triage/v1")
    digest = files_digest(read_manifest(src))
    assert store.manifest(uri) == read_manifest(src)
    out = store.download_dir(uri, tmp_path / "fetched", digest=digest)
    for name in [*read_manifest(src), MANIFEST]:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name


def test_a_corrupted_object_is_refused_and_nothing_is_written(store, tmp_path):
    src = adapter_folder(tmp_path / "adapter")
    uri = store.upload_dir(src, "adapters/t/v2")
    target = tmp_path / "fetched"
    target.mkdir()
    (target / "keep.txt").write_text("the copy already there")
    overwrite(store, f"{uri}/adapter_config.json", b'{"r": 64}')
    with pytest.raises(StorageError, match=r"adapter_config.json was changed after it was recorded: sha256 "):
        store.download_dir(uri, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]  # the old folder is left as it was
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fetched")]  # no temp folder left


def test_a_manifest_changed_with_the_files_is_refused_by_the_recorded_digest(store, tmp_path):
    src = adapter_folder(tmp_path / "adapter")
    digest = files_digest(read_manifest(src))
    uri = store.upload_dir(src, "adapters/t/v3")
    (src / "adapter_config.json").write_text('{"r": 64}')
    write_manifest(src)  # a consistent, but different, folder uploaded over the first
    store.upload_dir(src, "adapters/t/v3")
    with pytest.raises(StorageError, match=f"expected {digest}"):
        store.download_dir(uri, tmp_path / "fetched", digest=digest)
    assert store.download_dir(uri, tmp_path / "fetched")  # the folder itself is consistent


def test_a_folder_without_its_manifest_is_refused(store, tmp_path):
    src = adapter_folder(tmp_path / "adapter")
    store._write_file("adapters/t/half/adapter_config.json", src / "adapter_config.json")  # upload cut short
    with pytest.raises(StorageError, match=f"{MANIFEST}: no such object"):
        store.download_dir(store.uri("adapters/t/half"), tmp_path / "fetched")
    assert not (tmp_path / "fetched").exists()


def test_single_objects_carry_their_digest(store):
    uri = store.put_bytes("reports/support_triage/eval.json", b'{"accuracy": 0.9}')
    assert store.get_bytes(uri) == b'{"accuracy": 0.9}'
    overwrite(store, uri, b'{"accuracy": 1.0}')
    with pytest.raises(StorageError, match="refusing it"):
        store.get_bytes(uri)
    with pytest.raises(StorageError, match="no such object"):
        store.get_bytes(store.uri("reports/none.json"))
    with pytest.raises(ValueError, match="not an object of"):
        store.get_bytes("gs://elsewhere/x" if isinstance(store, LocalStorage) else "file:///etc/passwd")
    with pytest.raises(ValueError, match=r"without '\.\.'"):
        store.put_bytes("../outside", b"x")


# -- the configured feedback store: BigQuery contract, checked against DuckDB --------------------


def record(i: int, **kw) -> str:
    base = {"ts": 1_790_000_000 + i * 3600, "request_id": f"r{i}", "model": "champion", "version": "3",
            "status": 200, "latency_s": 0.5, "prompt_version": "1", "task": "support_triage",
            "messages": [{"role": "user", "content": f"question {i}"}], "response": f"answer {i}"}
    return json.dumps({**base, **kw}) + "\n"


@pytest.fixture()
def both_stores(tmp_path):
    """The same request records in the local store and in the (fake) BigQuery store."""
    log = tmp_path / "requests.jsonl"
    log.write_text(record(1) + record(2, status=500, response=None) + record(3, task="product_qa")
                   + record(4, task=None, messages=[{"role": "user", "content": "  "}])
                   + record(5, event="feedback") + record(6, ts=1_790_000_000 + 48 * 3600) + record(7, task=None))
    local = DuckDBFeedbackStore(warehouse=DuckDBWarehouse(path=str(tmp_path / "w.duckdb")))
    with fake_bigquery() as bq:
        cloud = fake_store()
        for s in (local, cloud):
            assert s.append(str(log), read_new_records(log, 0), COLUMNS) == 7
        yield local, cloud, bq


DAY = (datetime.fromtimestamp(1_790_000_000, UTC), datetime.fromtimestamp(1_790_000_000 + 24 * 3600, UTC))
READS = {  # the reads of drift, online quality, serving metrics, the rating queue and the label join
    "drift": RequestQuery(("request_id", "ts", "model", "adapter_version", "prompt_version", "input_text"),
                          task="support_triage", start=DAY[0], end=DAY[1], requests_only=True,
                          not_null=("input_text",), non_blank=("input_text",)),
    "quality": RequestQuery(("request_id", "ts", "input_text", "response_text", "record_json"), task="support_triage",
                            start=DAY[0], end=DAY[1], requests_only=True, status=200,
                            not_null=("request_id", "input_text", "response_text")),
    "serving": RequestQuery(("request_id", "ts", "event", "status", "latency_s"), task="support_triage",
                            start=DAY[0], end=DAY[1], order_by=("ts", "source_file", "source_offset")),
    "rating": RequestQuery(("request_id", "ts", "input_text"), task="support_triage", requests_only=True, status=200,
                           not_null=("request_id", "input_text", "response_text"), order_by=("ts desc", "request_id"),
                           limit=2),
    "labels": RequestQuery(("request_id", "input_text"), request_ids=("r3", "r7", "r-unknown"),
                           not_null=("input_text",)),
}


@pytest.mark.parametrize("read", sorted(READS))
def test_bigquery_reads_return_what_the_local_store_returns(both_stores, read):
    local, cloud, bq = both_stores
    expected = local.requests(READS[read])
    got = cloud.requests(READS[read])
    assert len(expected) > 0
    assert got.to_dict("records") == expected.to_dict("records")
    if "ts" in got:  # naive UTC timestamps in both (BigQuery's are converted)
        assert got["ts"].dtype.kind == expected["ts"].dtype.kind == "M" and got["ts"].dt.tz is None
    sql, params = bq.queries[-1]
    assert sql.startswith(f"select {', '.join(READS[read].columns)} from `{REQUESTS}`")
    assert "support_triage" not in sql and "r3" not in sql  # values travel as parameters only
    if READS[read].start is not None:
        assert [v for k, v in params.items() if v[0] == "TIMESTAMP"] == [("TIMESTAMP", DAY[0]), ("TIMESTAMP", DAY[1])]


def test_expected_rows_of_the_reads(both_stores):
    local, _, _ = both_stores
    assert local.requests(READS["drift"])["request_id"].tolist() == ["r1", "r2", "r7"]
    assert local.requests(READS["quality"])["request_id"].tolist() == ["r1", "r4", "r7"]
    assert local.requests(READS["rating"])["request_id"].tolist() == ["r6", "r7"]
    assert sorted(local.requests(READS["labels"])["request_id"]) == ["r3", "r7"]


def test_a_query_naming_an_unknown_column_is_refused():
    with pytest.raises(ValueError, match=r"unknown columns \['password'\]"):
        RequestQuery(("request_id", "password")).sql("t", lambda v: "?")


def test_the_label_join_takes_questions_from_bigquery(tmp_path):
    """raw_task_examples under the BigQuery store: the label naming only a request id gets its
    question from BigQuery; the local warehouse holds no request at all."""
    task = TaskRef("support_triage", str(REPO / "tasks"))
    labels = tmp_path / "feedback" / "labels" / "support_triage"
    labels.mkdir(parents=True)
    out = {"category": "technical_issue", "priority": "high", "product": "hub", "summary": "Hub blinks orange."}
    (labels / "review.jsonl").write_text(json.dumps({"request_id": "r1", "output": out}) + "\n")
    log = tmp_path / "endpoint" / "requests.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text(record(1))
    warehouse = DuckDBWarehouse(path=str(tmp_path / "w.duckdb"))
    with fake_bigquery():
        res = {"warehouse": warehouse, "feedback_store": fake_store(), "home": GenopsHome(root=str(tmp_path))}
        assert dg.materialize([request_log], resources=res).success
        result = dg.materialize([build_raw_examples(task)], resources=res)
    assert result.success
    mat = result.asset_materializations_for_node(task.step("raw_task_examples"))[0]
    assert mat.metadata["labelled_feedback_rows"].value == 1
    assert not warehouse.table_exists("feedback", "requests")
    rows = warehouse.query_df("select input_text from raw.task_examples where source_file like 'feedback/labels/%'")
    assert rows["input_text"].tolist() == ["question 1"]


# -- published adapters: trained on one node, fetched and checked on another ---------------------


def test_a_step_on_another_node_fetches_the_published_copy(store, tmp_path):
    src = adapter_folder(tmp_path / "adapter")
    digest = files_digest(read_manifest(src))
    uri = store.upload_dir(src, "adapters/t/v4")
    assert store.local_copy(src, uri, digest, tmp_path / "cache") == src  # written here: read in place
    elsewhere = tmp_path / "other-node" / "adapter"  # the path the training node recorded
    fetched = store.local_copy(elsewhere, uri, digest, tmp_path / "cache")
    assert fetched == tmp_path / "cache" / digest and read_manifest(fetched) == read_manifest(src)
    assert store.local_copy(elsewhere, uri, digest, tmp_path / "cache") == fetched  # fetched once per node
    with pytest.raises(StorageError, match="no published copy is recorded"):
        store.local_copy(elsewhere, None, digest, tmp_path / "cache2")


def test_tuned_adapter_publishes_the_adapter_to_gcs(gcs_emulator, tuning_res, tiny_model_dir, tmp_path):  # noqa: F811
    from dagster_gcp import GCSResource
    from test_qlora import _materialize_tuning

    gcs = GcsStorage(gcs=GCSResource(project="genops-test"), bucket=BUCKET, prefix="tuning")
    result = _materialize_tuning({**tuning_res, "storage": gcs}, tiny_model_dir,
                                 {"max_steps": 1, "batch_size": 4, "eval_every": 0, "save_every": 1, "log_every": 1,
                                  "rank": 4, "alpha": 8})
    assert result.success
    value = result.output_for_node("support_triage__tuned_adapter")
    assert value["adapter_uri"] == f"gs://{BUCKET}/tuning/adapters/support_triage/{value['version_key']}"
    assert gcs.manifest(value["adapter_uri"]) == value["adapter_files"]
    assert files_digest(value["adapter_files"]) == value["adapter_digest"]
    fetched = gcs.local_copy(tmp_path / "not-here", value["adapter_uri"], value["adapter_digest"], tmp_path / "cache")
    assert read_manifest(fetched) == read_manifest(value["adapter_dir"])
    # The mart rows it trained on, published beside it with their digests.
    mat = result.asset_materializations_for_node("support_triage__tuned_adapter")[0]
    data = gcs.download_dir(mat.metadata["dataset_uri"].value, tmp_path / "data")
    assert [len((data / f"{split}.jsonl").read_text().splitlines()) for split in ("train", "validation")] == [8, 4]
    assert json.loads((data / "train.jsonl").read_text().splitlines()[0])["example_id"] == "ex0"
