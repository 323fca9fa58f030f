"""One base model in memory with any number of LoRA adapters beside it, under served names.

The base itself answers with the adapters disabled. Adapters can be added or replaced while
serving: the new weights are loaded under a fresh internal name and swapped in under the lock,
so a request never sees a half-loaded adapter. A decode batch pins the adapter version it
started with; a replaced or removed adapter that is pinned is deleted when its last batch
lets go of it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Messages = Sequence[Mapping[str, str]]


@dataclass
class LoadedModel:
    model: Any  # a transformers model, or a peft PeftModel once an adapter is loaded
    tokenizer: Any
    base_dir: str
    device: str
    adapters: dict[str, str] = field(default_factory=dict)  # served name -> adapter folder
    internal: dict[str, str] = field(default_factory=dict)  # served name -> peft adapter name
    labels: dict[str, str] = field(default_factory=dict)  # peft adapter name -> its registry version
    lock: threading.RLock = field(default_factory=threading.RLock)
    _counter: Any = field(default_factory=lambda: itertools.count(1))
    # peft adapters a running decode batch still uses (internal name -> users); a replaced or
    # removed adapter that is pinned is deleted only when its last batch lets go of it
    pinned: dict[str, int] = field(default_factory=dict)
    retired: set[str] = field(default_factory=set)
    # KV caches of recent prompts (generation and choice scoring), most recently used last:
    # (peft adapter or None, prompt tokens, [(keys, values) per layer] of one row)
    prefixes: list[tuple[str | None, tuple[int, ...], list]] = field(default_factory=list)

    def internal_name(self, adapter: str | None) -> str | None:
        """The peft adapter serving ``adapter`` now (None: the base); a clear error when it is not loaded."""
        if adapter is None:
            return None
        if adapter not in self.internal:
            raise KeyError(f"adapter '{adapter}' is not loaded (loaded: {sorted(self.internal)})")
        return self.internal[adapter]


def _torch_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return getattr(torch, dtype)
    except AttributeError as exc:
        raise ValueError(f"unknown dtype '{dtype}' (use float32, bfloat16, float16 or auto)") from exc


def load_model(
    base_dir: str | Path,
    adapters: Mapping[str, str | Path] | None = None,
    dtype: str = "auto",
    device: str | None = None,
    quantization: str = "none",
) -> LoadedModel:
    """Load the base model folder and the given adapters (served name -> adapter folder). The
    folder must hold safetensors weights only (and match its manifest when it has one).
    ``quantization`` (none | nf4 | int8) loads the base through bitsandbytes, ``dtype`` being the
    nf4 compute dtype; ``QuantizationUnavailable`` when this machine cannot."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genops_assets.lib.integrity import verify_model_folder
    from genops_assets.lib.quantization import require_quantization, to_bnb_config

    base_dir = str(base_dir)
    if not Path(base_dir, "config.json").is_file():
        raise FileNotFoundError(f"{base_dir}: not a Hugging Face model folder (no config.json)")
    verify_model_folder(base_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    require_quantization(quantization, "quantization", device)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    bnb_config = to_bnb_config(quantization, dtype, device=device)
    # bitsandbytes quantizes while placing the weights: straight onto the device, never moved after
    placed = {} if bnb_config is None else {"quantization_config": bnb_config, "device_map": {"": device}}
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=_torch_dtype(dtype, device),
                                                 use_safetensors=True, **placed)
    if bnb_config is None:
        model = model.to(device)
    model.eval()
    loaded = LoadedModel(model=model, tokenizer=tokenizer, base_dir=base_dir, device=device)
    for name, path in (adapters or {}).items():
        add_adapter(loaded, name, path)
    return loaded


def add_adapter(loaded: LoadedModel, name: str, adapter_dir: str | Path, version: str | None = None) -> None:
    """Serve ``adapter_dir`` as ``name``, replacing any adapter already served under it;
    ``version`` labels this load (what a request answered by it reports). The folder's files
    must match its sha256 manifest, with no pickle among them (``IntegrityError`` otherwise)."""
    from genops_assets.lib.integrity import verify_folder

    adapter_dir = str(adapter_dir)
    if not Path(adapter_dir, "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
    check_adapter_base(adapter_dir, loaded.base_dir)
    verify_folder(adapter_dir)
    internal = f"{_safe(name)}_{next(loaded._counter)}"
    with loaded.lock:
        from peft import PeftModel

        if isinstance(loaded.model, PeftModel):
            loaded.model.load_adapter(adapter_dir, adapter_name=internal)
        else:
            loaded.model = PeftModel.from_pretrained(loaded.model, adapter_dir, adapter_name=internal)
        loaded.model.eval()
        old = loaded.internal.get(name)
        if version is not None:
            loaded.labels[internal] = str(version)
        loaded.internal[name] = internal
        loaded.adapters[name] = adapter_dir
        if old is not None:
            _delete(loaded, old)


def check_adapter_base(adapter_dir: str, base_dir: str) -> None:
    """Refuse an adapter trained on another base model. The adapter records its base as a path
    or a hub id: the last path component must name the served base folder (the same model
    converted or copied elsewhere keeps its folder name)."""
    try:
        cfg = json.loads(Path(adapter_dir, "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{adapter_dir}/adapter_config.json is unreadable: {exc}") from exc
    recorded = (cfg.get("base_model_name_or_path") or "").rstrip("/")
    if recorded and Path(recorded).name != Path(base_dir.rstrip("/")).name:
        raise ValueError(f"{adapter_dir}: adapter was trained on '{recorded}', but this server's base model is "
                         f"'{base_dir}'; refusing to load it")


def remove_adapter(loaded: LoadedModel, name: str) -> None:
    with loaded.lock:
        internal = loaded.internal.pop(name)
        loaded.adapters.pop(name, None)
        _delete(loaded, internal)


def pin(loaded: LoadedModel, adapter: str | None) -> str | None:
    """Keep the version now served as ``adapter`` loaded until ``unpin``; returns its peft name."""
    with loaded.lock:
        internal = loaded.internal_name(adapter)
        if internal is not None:
            loaded.pinned[internal] = loaded.pinned.get(internal, 0) + 1
    return internal


def unpin(loaded: LoadedModel, internal: str) -> None:
    """Let go of a pinned version: deleted now if it was replaced or removed meanwhile."""
    with loaded.lock:
        loaded.pinned[internal] -= 1
        if not loaded.pinned[internal]:
            del loaded.pinned[internal]
            if internal in loaded.retired and internal not in loaded.internal.values():
                loaded.retired.discard(internal)
                _delete(loaded, internal)


def _delete(loaded: LoadedModel, internal: str) -> None:
    if loaded.pinned.get(internal):
        loaded.retired.add(internal)
        return
    loaded.labels.pop(internal, None)
    model = loaded.model
    remaining = [a for a in loaded.internal.values() if a != internal]
    if remaining and internal in (model.active_adapters if hasattr(model, "active_adapters") else []):
        model.set_adapter(remaining[0])
    if remaining:
        model.delete_adapter(internal)
    # With no adapter left the last one stays loaded but is never selected (base runs disabled).


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name) or "adapter"


@contextlib.contextmanager
def selected(loaded: LoadedModel, adapter: str | None, internal: str | None = None):
    """Hold the model lock with ``adapter`` active (all adapters off for the base), no grad.
    ``internal`` names the peft adapter directly (a decode batch pinned to one version)."""
    import torch

    with loaded.lock:
        from peft import PeftModel

        model = loaded.model
        internal = internal or (loaded.internal[adapter] if adapter is not None else None)
        if internal is None and isinstance(model, PeftModel):
            ctx = model.disable_adapter()
        else:
            ctx = contextlib.nullcontext()
            if internal is not None:
                model.set_adapter(internal)
        with ctx, torch.inference_mode():
            yield model
