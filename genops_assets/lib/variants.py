"""Variants of a tuned model that serve without LoRA: the adapter merged into the base weights
(a safetensors folder), and GGUF files of it for llama.cpp (``lib/gguf_export``).

Every variant is a folder with a ``genops-manifest.json`` (the sha256 of each file), written
atomically (a temp folder renamed into place), and described by a ``VariantFiles``. Heavy
imports (torch, transformers, peft) happen inside the functions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from genops_assets.lib.hashing import atomic_dir, sha256_dir
from genops_assets.lib.integrity import verify_folder, verify_model_folder, write_manifest

ORIGINAL = "original"
MERGED = "merged"
Q8_0 = "q8_0"
Q4_K_M = "q4_k_m"
DISTILLED = "distilled"
BUILT_HERE = (MERGED, Q8_0, Q4_K_M)
"""The variants this module builds from a tuned adapter (``distilled`` is trained elsewhere)."""

WEIGHT_SUFFIXES = (".safetensors", ".gguf")
VARIANT_INFO = "genops_variant.json"


class VariantError(RuntimeError):
    """A variant cannot be built or loaded; the message names the file and the step."""


@dataclass(frozen=True)
class VariantFiles:
    name: str            # variant name
    path: str            # a folder: safetensors model folder, or a folder holding exactly one .gguf
    format: str          # "safetensors" | "gguf"
    engine: str          # "local" (genops engine) | "llamacpp"
    parent: str | None   # variant it was made from ("merged" for q8_0 / q4_k_m), None for merged
    size_bytes: int      # weights on disk (sum of model files)
    digest: str          # sha256 of the folder (lib.hashing.sha256_dir)

    def as_dict(self) -> dict:
        return asdict(self)


def weights_size(folder: str | Path) -> int:
    """Bytes of the model weight files of a variant folder (safetensors and GGUF files)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def describe(folder: str | Path, name: str, fmt: str, engine: str, parent: str | None) -> VariantFiles:
    return VariantFiles(name=name, path=str(folder), format=fmt, engine=engine, parent=parent,
                        size_bytes=weights_size(folder), digest=sha256_dir(folder))


def gguf_file(folder: str | Path) -> Path:
    """The single ``.gguf`` of a variant folder; VariantError when there is none or several."""
    root = Path(folder)
    if not root.is_dir():
        raise VariantError(f"{root}: not a folder (expected a GGUF variant folder)")
    found = sorted(root.glob("*.gguf"))
    if len(found) != 1:
        raise VariantError(f"{root}: expected exactly one .gguf file, found {len(found)}"
                           + (f" ({', '.join(p.name for p in found)})" if found else ""))
    return found[0]


def stage(log: Callable[[str], None], what: str):
    """A context manager logging ``what`` when it starts and its seconds when it ends."""
    import contextlib

    @contextlib.contextmanager
    def timed():
        log(f"{what} ...")
        t0 = time.perf_counter()
        yield
        log(f"{what}: done in {time.perf_counter() - t0:.1f}s")

    return timed()


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *,
                  log: Callable[[str], None] = print, name: str = MERGED,
                  keep_files: tuple[str, ...] = ()) -> VariantFiles:
    """The LoRA adapter of ``adapter_dir`` merged into the weights of ``base_dir`` (PEFT
    ``merge_and_unload``), saved as an fp32 safetensors folder at ``out_dir`` with the base's
    config and tokenizer files and a manifest. The adapter's manifest and the base folder are
    checked before loading; ``keep_files`` of the base folder are copied along (a pruned
    student's record of its layers). Cost: a few seconds for the embedded 135M model."""
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    try:
        verify_model_folder(base_dir)
        verify_folder(adapter_dir)
    except ValueError as exc:
        raise VariantError(f"merge: {exc}") from exc

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with stage(log, f"merge: loading {base_dir.name} with adapter {adapter_dir.name}"):
        try:
            base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            model = PeftModel.from_pretrained(base, adapter_dir)
            tokenizer = AutoTokenizer.from_pretrained(base_dir)
        except Exception as exc:  # transformers / peft raise many types for a bad folder
            raise VariantError(f"merge: cannot load {base_dir} with adapter {adapter_dir}: {exc}") from exc
    with stage(log, "merge: merge_and_unload"):
        merged = model.merge_and_unload()
    with stage(log, f"merge: writing {out_dir}"), atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for extra in keep_files:
            if (base_dir / extra).is_file() and not (tmp / extra).exists():
                (tmp / extra).write_bytes((base_dir / extra).read_bytes())
        (tmp / VARIANT_INFO).write_text(json.dumps({
            "variant": name, "base_model": str(base_dir), "adapter": str(adapter_dir),
            "adapter_manifest": json.loads((adapter_dir / "genops-manifest.json").read_text()),
        }, indent=2, sort_keys=True) + "\n")
        write_manifest(tmp)
    return describe(out_dir, name, "safetensors", "local", None)


def check_merged_loads(folder: str | Path, prompt: str = "Hello") -> dict:
    """Load a merged (or any safetensors) variant folder after checking its manifest and run
    one forward pass: the top token and that the logits are finite. VariantError on failure."""
    try:
        verify_folder(folder)
    except ValueError as exc:
        raise VariantError(f"load check: {exc}") from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]
    except Exception as exc:
        raise VariantError(f"load check: {folder}: cannot load or run the model: {exc}") from exc
    if not bool(torch.isfinite(logits).all()):
        raise VariantError(f"load check: {folder}: the logits of {prompt!r} are not finite")
    return {"engine": "transformers", "prompt": prompt, "top_token": int(logits.argmax())}
