"""Integrity of model files: a per-file sha256 manifest recorded when an adapter is written and
registered, checked before every load; only safetensors weights are accepted.

A LoRA adapter folder carries ``genops-manifest.json`` (the sha256 of each of its other files).
Registration records the same per-file digests on the registry version (the trusted copy: it
lives in the tracking store, not beside the files), and fetching a version checks the
downloaded files against them. Loading (the endpoint, evaluation, judges, DPO) checks the
folder against its manifest, so a file changed after it was recorded, added or removed is
refused with the file named and both digests.

Pickle files are refused outright, by name (``*.bin``, ``*.pt`` ...) or by content (a pickle
stream, or a zip archive holding one, as ``torch.save`` writes): loading a pickle runs code.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

from genops_assets.lib.hashing import atomic_write_json, sha256_file, sha256_json

MANIFEST = "genops-manifest.json"
ALGORITHM = "sha256"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
_ZIP_MAGIC = b"PK\x03\x04"


class IntegrityError(ValueError):
    """Model files that must not be loaded: a pickle, a changed, missing or unexpected file."""


def _valid_safetensors(path: Path, head: bytes) -> bool:
    """A safetensors file starts with the 8-byte little-endian length of a JSON header."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= path.stat().st_size - 8 and head[8:9] == b"{"


def _holds_pickle(path: Path, head: bytes) -> bool:
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle protocol 2..5 opcode
        return True
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as zf:
                return any(n.endswith((".pkl", ".pickle")) for n in zf.namelist())
        except zipfile.BadZipFile:
            return False
    return False


def pickle_problem(path: Path) -> str | None:
    """Why ``path`` must not be loaded as model data, or None."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return f"a pickle file by its extension ({path.suffix})"
    with open(path, "rb") as fh:
        head = fh.read(16)
    if path.suffix.lower() == ".safetensors":
        return None if _valid_safetensors(path, head) else "named .safetensors but not a safetensors file"
    if _holds_pickle(path, head):
        return "pickle data by its content (pickle magic bytes or a torch zip archive)"
    return None


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def refuse_pickles(folder: str | Path) -> None:
    """IntegrityError naming the first file of ``folder`` that is (or claims to be) pickled
    weights instead of safetensors."""
    root = Path(folder)
    for path in _files(root):
        problem = pickle_problem(path)
        if problem:
            raise IntegrityError(f"{root}: refusing to load {path.relative_to(root).as_posix()}: {problem}; "
                                 "only safetensors weights are accepted (save with safe_serialization=True)")


def folder_files(folder: str | Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` but the manifest, keyed by relative path."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in _files(root)}


def files_digest(files: Mapping[str, str]) -> str:
    """One digest of a folder's per-file digests (the registry's ``genops.adapter_digest``)."""
    return sha256_json(dict(files))


def write_manifest(folder: str | Path) -> dict:
    """Record the sha256 of each file of ``folder`` in its ``genops-manifest.json`` (atomically);
    returns the manifest. A folder holding pickles is refused first."""
    refuse_pickles(folder)
    manifest = {"algorithm": ALGORITHM, "files": folder_files(folder)}
    atomic_write_json(Path(folder) / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | Path) -> dict[str, str]:
    """The per-file digests the folder's manifest records; IntegrityError when it has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise IntegrityError(f"{folder}: no {MANIFEST}, so its files' sha256 were never recorded; refusing to "
                             "load it (genops records them when it writes and registers an adapter)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        algorithm = manifest["algorithm"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{path}: unreadable manifest: {exc}") from exc
    if algorithm != ALGORITHM or not isinstance(files, dict):
        raise IntegrityError(f"{path}: expected {{'algorithm': '{ALGORITHM}', 'files': {{path: digest}}}}")
    return {str(k): str(v) for k, v in files.items()}


def verify_folder(folder: str | Path, expected: Mapping[str, str] | None = None) -> None:
    """Check every file of ``folder`` against ``expected`` (relative path -> sha256; by default
    the folder's own manifest): pickles, changed, missing and unexpected files raise
    IntegrityError naming the file (and, for a changed one, both digests)."""
    root = Path(folder)
    if not root.is_dir():
        raise IntegrityError(f"{root}: not a folder")
    refuse_pickles(root)
    wanted = dict(expected) if expected is not None else read_manifest(root)
    actual = folder_files(root)
    recorded_by = "the registry" if expected is not None else MANIFEST
    for name, digest in sorted(wanted.items()):
        if name not in actual:
            raise IntegrityError(f"{root}: {name} is missing (recorded in {recorded_by} with sha256 {digest})")
        if actual[name] != digest:
            raise IntegrityError(f"{root}: {name} was changed after it was recorded: sha256 {actual[name]}, "
                                 f"recorded {digest} (in {recorded_by}); refusing to load it")
    extra = sorted(set(actual) - set(wanted))
    if extra:
        raise IntegrityError(f"{root}: {', '.join(extra)} not recorded in {recorded_by}: files were added after "
                             "the folder was recorded; refusing to load it")


def record_folder(folder: str | Path) -> dict[str, str]:
    """The per-file digests to register for ``folder``: its manifest, checked, when it has one
    (written when the adapter was trained), else a manifest written now."""
    if (Path(folder) / MANIFEST).is_file():
        verify_folder(folder)
        return read_manifest(folder)
    return write_manifest(folder)["files"]


def verify_model_folder(folder: str | Path) -> None:
    """Before loading a base model folder: no pickled weights, and the files match its manifest
    when it has one (a user's Hugging Face folder need not)."""
    refuse_pickles(folder)
    if (Path(folder) / MANIFEST).is_file():
        verify_folder(folder)
