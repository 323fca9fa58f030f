"""Model files are recorded with sha256 and checked before every load: a tampered adapter (one
byte changed) and a pickle-bearing adapter are refused with errors naming the file, at
registration, at fetch and at the endpoint's hot reload; an intact adapter still loads."""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
import urllib.request
import zipfile
from pathlib import Path

import pytest
from graph_support import free_port

from genops_assets.lib.integrity import (
    MANIFEST,
    IntegrityError,
    files_digest,
    folder_files,
    read_manifest,
    record_folder,
    refuse_pickles,
    verify_folder,
    write_manifest,
)
from genops_assets.serving import control
from genops_assets.serving.registry_watch import DIGEST_TAG, FILES_TAG
from resources.tracking import MlflowTracking, integrity_tags

WEIGHTS = "adapter_model.safetensors"


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flip_one_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def torch_style_zip() -> bytes:
    """What ``torch.save`` writes: a zip archive whose data.pkl is a pickle."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": [1.0]}))
    return buf.getvalue()


def test_an_intact_adapter_verifies_and_its_manifest_covers_every_file(tiny_adapter_dir, tmp_path):
    adapter = copy_adapter(tiny_adapter_dir, tmp_path / "a")
    verify_folder(adapter)
    recorded = read_manifest(adapter)
    assert set(recorded) == {p.name for p in adapter.iterdir() if p.name != MANIFEST}
    assert WEIGHTS in recorded and recorded == folder_files(adapter)
    assert record_folder(adapter) == recorded  # registration reuses the manifest training wrote


def test_one_changed_byte_is_refused_naming_the_file_and_both_digests(tiny_adapter_dir, tmp_path):
    adapter = copy_adapter(tiny_adapter_dir, tmp_path / "a")
    recorded = read_manifest(adapter)[WEIGHTS]
    flip_one_byte(adapter / WEIGHTS)
    actual = folder_files(adapter)[WEIGHTS]
    with pytest.raises(IntegrityError) as err:
        verify_folder(adapter)
    message = str(err.value)
    assert WEIGHTS in message and recorded in message and actual in message and recorded != actual
    with pytest.raises(IntegrityError, match=WEIGHTS):
        record_folder(adapter)  # nor can it be registered


def test_added_removed_and_unrecorded_files_are_refused(tiny_adapter_dir, tmp_path):
    added = copy_adapter(tiny_adapter_dir, tmp_path / "added")
    (added / "extra.json").write_text("{}")
    with pytest.raises(IntegrityError, match=re.escape("extra.json not recorded")):
        verify_folder(added)
    removed = copy_adapter(tiny_adapter_dir, tmp_path / "removed")
    (removed / "adapter_config.json").unlink()
    with pytest.raises(IntegrityError, match=re.escape("adapter_config.json is missing")):
        verify_folder(removed)
    bare = copy_adapter(tiny_adapter_dir, tmp_path / "bare")
    (bare / MANIFEST).unlink()
    with pytest.raises(IntegrityError, match=f"no {MANIFEST}"):
        verify_folder(bare)


@pytest.mark.parametrize(("name", "content", "why"), [
    ("adapter_model.bin", b"anything", "by its extension"),
    ("optimizer.pt", b"anything", "by its extension"),
    ("weights.dat", pickle.dumps({"w": 1}, protocol=4), "by its content"),
    ("archive.data", torch_style_zip(), "by its content"),
    ("extra.safetensors", pickle.dumps([1, 2, 3]), "not a safetensors file"),
])
def test_pickle_bearing_adapters_are_refused_naming_the_file(tiny_adapter_dir, tmp_path, name, content, why):
    adapter = copy_adapter(tiny_adapter_dir, tmp_path / "a")
    (adapter / name).write_bytes(content)
    for check in (refuse_pickles, write_manifest, verify_folder):
        with pytest.raises(IntegrityError, match=why) as err:
            check(adapter)
        assert name in str(err.value) and "only safetensors" in str(err.value)


def test_safetensors_whose_header_starts_like_a_pickle_are_accepted(tmp_path):
    # A header of 640 bytes starts 0x80 0x02: the bytes a pickle starts with.
    header = json.dumps({"__metadata__": {"pad": "x" * 580}}).encode().ljust(640)
    (tmp_path / WEIGHTS).write_bytes(len(header).to_bytes(8, "little") + header)
    assert (tmp_path / WEIGHTS).read_bytes()[:2] == b"\x80\x02"
    refuse_pickles(tmp_path)


def registry(tmp_path) -> MlflowTracking:
    return MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                          artifact_root=(tmp_path / "artifacts").as_uri())


def register_folder(tracking: MlflowTracking, adapter: Path, name: str = "genops-integrity") -> str:
    """Register ``adapter`` as a bare folder version with its per-file digests, as judges are."""
    files = record_folder(adapter)
    with tracking.run("integrity", "adapter", {}) as run_id:
        tracking.log_artifacts(run_id, adapter, "adapter")
        mv = tracking.register(name, tracking.artifact_uri(run_id, "adapter"), run_id, tags=integrity_tags(files))
    assert json.loads(mv.tags[FILES_TAG]) == files and mv.tags[DIGEST_TAG] == files_digest(files)
    return mv.version


def test_registration_records_each_file_and_fetch_refuses_a_tampered_copy(tiny_adapter_dir, tmp_path):
    tracking = registry(tmp_path)
    version = register_folder(tracking, copy_adapter(tiny_adapter_dir, tmp_path / "a"))
    cache = tmp_path / "cache"
    fetched = tracking.fetch_registered_adapter(cache, "genops-integrity", version)
    verify_folder(fetched)
    recorded = read_manifest(fetched)[WEIGHTS]

    flip_one_byte(fetched / WEIGHTS)  # the cached copy changed after download
    with pytest.raises(IntegrityError) as err:
        tracking.fetch_registered_adapter(cache, "genops-integrity", version)
    assert f"genops-integrity v{version}" in str(err.value) and WEIGHTS in str(err.value)
    assert recorded in str(err.value) and "registry" in str(err.value)


def test_fetch_refuses_a_store_copy_changed_after_registration(tiny_adapter_dir, tmp_path):
    tracking = registry(tmp_path)
    version = register_folder(tracking, copy_adapter(tiny_adapter_dir, tmp_path / "a"))
    stored = next((tmp_path / "artifacts").rglob(f"adapter/{WEIGHTS}"))
    flip_one_byte(stored)
    # Rewriting the stored manifest too does not help: the registry holds the digests.
    write_manifest(stored.parent)
    with pytest.raises(IntegrityError, match=WEIGHTS):
        tracking.fetch_registered_adapter(tmp_path / "cache", "genops-integrity", version)


def test_a_pickle_bearing_adapter_cannot_be_registered(tiny_adapter_dir, tmp_path):
    adapter = copy_adapter(tiny_adapter_dir, tmp_path / "a")
    (adapter / MANIFEST).unlink()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(IntegrityError, match=re.escape("adapter_model.bin")):
        register_folder(registry(tmp_path), adapter)


def models(url: str) -> dict[str, str]:
    data = json.loads(urllib.request.urlopen(f"{url}/v1/models", timeout=10).read())["data"]
    return {m["id"]: m.get("version") for m in data}


@pytest.mark.server
def test_the_endpoint_reload_refuses_tampered_and_pickle_adapters_and_loads_an_intact_one(
        tiny_model_dir, tiny_adapters, tmp_path):
    state_dir = tmp_path / "endpoint"
    state = control.start_server(str(tiny_model_dir), {"integrity": str(tiny_adapters(1))}, {"integrity": "1"},
                                 state_dir, port=free_port(), env={"GENOPS_API_KEYS": ""}, ready_timeout_s=180)
    try:
        tampered = copy_adapter(tiny_adapters(2), tmp_path / "tampered")
        recorded = read_manifest(tampered)[WEIGHTS]
        flip_one_byte(tampered / WEIGHTS)
        actual = folder_files(tampered)[WEIGHTS]
        with pytest.raises(control.EndpointError) as err:
            control.reload_adapter(state_dir, "integrity", str(tampered), "2")
        assert WEIGHTS in str(err.value) and recorded in str(err.value) and actual in str(err.value)

        pickled = copy_adapter(tiny_adapters(2), tmp_path / "pickled")
        (pickled / "adapter_model.bin").write_bytes(pickle.dumps({"w": 1}))
        with pytest.raises(control.EndpointError, match=re.escape("adapter_model.bin")):
            control.reload_adapter(state_dir, "integrity", str(pickled), "2")
        assert models(state.url)["integrity"] == "1"  # still the version it served

        control.reload_adapter(state_dir, "integrity", str(copy_adapter(tiny_adapters(2), tmp_path / "ok")), "2")
        assert models(state.url)["integrity"] == "2"
        body = json.dumps({"model": "integrity", "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": 2}).encode()
        req = urllib.request.Request(f"{state.url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())
        assert answer["system_fingerprint"] == "2"
    finally:
        control.stop_server(state_dir)


@pytest.mark.server
def test_the_endpoint_refuses_to_start_on_a_pickled_base_model(tiny_model_dir, tiny_adapter_dir, tmp_path):
    base = copy_adapter(tiny_model_dir, tmp_path / "base")
    (base / "pytorch_model.bin").write_bytes(torch_style_zip())
    with pytest.raises(control.EndpointError, match=re.escape("pytorch_model.bin")):
        control.start_server(str(base), {"integrity": str(tiny_adapter_dir)}, {"integrity": "1"},
                             tmp_path / "endpoint", port=free_port(), env={"GENOPS_API_KEYS": ""},
                             ready_timeout_s=120)


@pytest.mark.graph  # loads the tiny Llama
def test_a_registered_version_holds_no_pickle_and_loads_with_unpickling_off(tiny_model_dir, tiny_adapter_dir,
                                                                            tmp_path, monkeypatch):
    import mlflow.artifacts
    import mlflow.pyfunc
    from graph_support import REPO, register_version
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from genops_assets.lib.prompts import prompt_registry_name
    from genops_assets.lib.tasks import load_task
    from resources.tracking import registered_model_name

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    tracking = registry(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri)  # MLflow's default store: this one
    spec = load_task(REPO / "tasks", "support_triage")
    prompt, _ = tracking.register_prompt(prompt_registry_name(spec.name), spec.prompt, "the task's prompt")
    version = register_version(tracking, prompt, tiny_adapter_dir, tiny_model_dir)
    name = registered_model_name(spec.name)
    mv = tracking.get_version(name, version)
    assert json.loads(mv.tags[FILES_TAG]) == read_manifest(tiny_adapter_dir)
    model_uri = tracking.client().get_model_version_download_uri(name, version)
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp_path / "model"),
                                                         tracking_uri=tracking.tracking_uri))
    assert (model_dir / "MLmodel").is_file()
    refuse_pickles(model_dir)  # the whole MLflow model: no pickled Python object, no pickled weights
    with _use_tracking_uri(tracking.tracking_uri):
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    answers = model.predict([{"message": "my camera is offline"}], params={"max_new_tokens": 2})
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_a_base_model_folder_with_pickled_weights_is_refused_when_resolved(tiny_model_dir, tmp_path):
    from genops_assets.lib.base_model import BaseModelError, resolve_local_folder

    base = copy_adapter(tiny_model_dir, tmp_path / "base")
    resolve_local_folder(base)
    (base / "training_args.bin").write_bytes(pickle.dumps({"lr": 1e-3}))
    with pytest.raises(BaseModelError, match=re.escape("training_args.bin")):
        resolve_local_folder(base)
