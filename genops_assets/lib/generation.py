"""Batched chat generation on a Hugging Face causal LM with any number of LoRA adapters.

One base model stays in memory; adapters are loaded beside it under served names and
selected per batch (the base itself answers with the adapters disabled). Adapters can be
added or replaced while serving: the new weights are loaded under a fresh internal name and
swapped in under the lock, so a request never sees a half-loaded adapter.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Messages = Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    finish_reason: str  # "stop" (end of turn or a stop string) | "length"


@dataclass
class LoadedModel:
    model: Any  # a transformers model, or a peft PeftModel once an adapter is loaded
    tokenizer: Any
    base_dir: str
    device: str
    adapters: dict[str, str] = field(default_factory=dict)  # served name -> adapter folder
    internal: dict[str, str] = field(default_factory=dict)  # served name -> peft adapter name
    lock: threading.RLock = field(default_factory=threading.RLock)
    _counter: Any = field(default_factory=lambda: itertools.count(1))


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
) -> LoadedModel:
    """Load the base model folder and the given adapters (served name -> adapter folder)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = str(base_dir)
    if not Path(base_dir, "config.json").is_file():
        raise FileNotFoundError(f"{base_dir}: not a Hugging Face model folder (no config.json)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=_torch_dtype(dtype, device)).to(device)
    model.eval()
    loaded = LoadedModel(model=model, tokenizer=tokenizer, base_dir=base_dir, device=device)
    for name, path in (adapters or {}).items():
        add_adapter(loaded, name, path)
    return loaded


def add_adapter(loaded: LoadedModel, name: str, adapter_dir: str | Path) -> None:
    """Serve ``adapter_dir`` as ``name``, replacing any adapter already served under it."""
    adapter_dir = str(adapter_dir)
    if not Path(adapter_dir, "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
    internal = f"{_safe(name)}_{next(loaded._counter)}"
    with loaded.lock:
        from peft import PeftModel

        if isinstance(loaded.model, PeftModel):
            loaded.model.load_adapter(adapter_dir, adapter_name=internal)
        else:
            loaded.model = PeftModel.from_pretrained(loaded.model, adapter_dir, adapter_name=internal)
        loaded.model.eval()
        old = loaded.internal.get(name)
        loaded.internal[name] = internal
        loaded.adapters[name] = adapter_dir
        if old is not None:
            _delete(loaded, old)


def remove_adapter(loaded: LoadedModel, name: str) -> None:
    with loaded.lock:
        internal = loaded.internal.pop(name)
        loaded.adapters.pop(name, None)
        _delete(loaded, internal)


def _delete(loaded: LoadedModel, internal: str) -> None:
    model = loaded.model
    remaining = [a for a in loaded.internal.values() if a != internal]
    if remaining and internal in (model.active_adapters if hasattr(model, "active_adapters") else []):
        model.set_adapter(remaining[0])
    if remaining:
        model.delete_adapter(internal)
    # With no adapter left the last one stays loaded but is never selected (base runs disabled).


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name) or "adapter"


def generate(
    loaded: LoadedModel,
    messages_batch: Sequence[Messages],
    adapter: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] | None = None,
    batch_size: int = 8,
    seed: int | None = None,
) -> list[GenerationResult]:
    """Answer each conversation; greedy when ``temperature`` is 0. ``adapter=None`` is the base."""
    if adapter is not None and adapter not in loaded.internal:
        raise KeyError(f"adapter '{adapter}' is not loaded (loaded: {sorted(loaded.internal)})")
    results: list[GenerationResult] = []
    for start in range(0, len(messages_batch), max(1, batch_size)):
        results.extend(_generate_batch(loaded, messages_batch[start : start + batch_size], adapter,
                                       max_new_tokens, temperature, top_p, list(stop or []), seed))
    return results


def _generate_batch(loaded, batch, adapter, max_new_tokens, temperature, top_p, stop, seed):
    import contextlib

    import torch

    tok = loaded.tokenizer
    texts = [tok.apply_chat_template(list(m), tokenize=False, add_generation_prompt=True) for m in batch]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(loaded.device)
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        if seed is not None:
            torch.manual_seed(seed)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    with loaded.lock:
        from peft import PeftModel

        model = loaded.model
        if adapter is None and isinstance(model, PeftModel):
            ctx = model.disable_adapter()
        else:
            ctx = contextlib.nullcontext()
            if adapter is not None:
                model.set_adapter(loaded.internal[adapter])
        started = time.perf_counter()
        with ctx, torch.inference_mode():
            out = model.generate(**enc, **kwargs)
        latency = time.perf_counter() - started
    prompt_len = enc["input_ids"].shape[1]
    results = []
    for row, mask in zip(out, enc["attention_mask"], strict=True):
        new = row[prompt_len:].tolist()
        finish = "length"
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
            finish = "stop"
        text = tok.decode(new, skip_special_tokens=True)
        for s in stop:
            if s and s in text:
                text, finish = text[: text.index(s)], "stop"
        results.append(GenerationResult(text=text.strip(), prompt_tokens=int(mask.sum()),
                                        completion_tokens=len(new), latency_s=latency, finish_reason=finish))
    return results
