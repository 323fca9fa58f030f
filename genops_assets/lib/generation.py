"""Batched chat generation on a Hugging Face causal LM with any number of LoRA adapters.

One base model stays in memory; adapters are loaded beside it under served names and
selected per batch (the base itself answers with the adapters disabled). Adapters can be
added or replaced while serving: the new weights are loaded under a fresh internal name and
swapped in under the lock, so a request never sees a half-loaded adapter.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Messages = Sequence[Mapping[str, str]]

TokenSink = Callable[[int | None, str | None], bool]
"""Per-conversation hook into the decoding loop (streaming, cancellation).

Called once per decoding step with the token just generated for that conversation, or
``None`` when it is the end-of-turn token, and the finish reason (``"stop"``, ``"length"``)
on the step that ends the conversation. Returning True stops that conversation at once
(client gone, stop string seen); the rest of the batch keeps decoding. It runs inside the
model call, so it must be quick and must not raise."""


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
    check_adapter_base(adapter_dir, loaded.base_dir)
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


def check_adapter_base(adapter_dir: str, base_dir: str) -> None:
    """Refuse an adapter trained on another base model. The adapter records its base as a path
    or a hub id: the last path component must name the served base folder (the same model
    converted or copied elsewhere keeps its folder name)."""
    import json

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
    token_sinks: Sequence[TokenSink | None] | None = None,
) -> list[GenerationResult]:
    """Answer each conversation; greedy when ``temperature`` is 0. ``adapter=None`` is the base.

    ``token_sinks`` (one per conversation, ``None`` for none) receive each token as it is
    decoded; a conversation whose sink asks to stop ends there (its result holds the tokens
    generated until then, finish reason "stop") while the others continue."""
    if adapter is not None and adapter not in loaded.internal:
        raise KeyError(f"adapter '{adapter}' is not loaded (loaded: {sorted(loaded.internal)})")
    if token_sinks is not None and len(token_sinks) != len(messages_batch):
        raise ValueError(f"token_sinks has {len(token_sinks)} entries for {len(messages_batch)} conversations")
    results: list[GenerationResult] = []
    step = max(1, batch_size)
    for start in range(0, len(messages_batch), step):
        sinks = None if token_sinks is None else list(token_sinks[start : start + step])
        results.extend(_generate_batch(loaded, messages_batch[start : start + step], adapter,
                                       max_new_tokens, temperature, top_p, list(stop or []), seed, sinks))
    return results


def _row_hooks(sinks: Sequence[TokenSink | None], prompt_len: int, end_id: int, max_new_tokens: int):
    """A stopping criterion that feeds each row's new token to its sink and stops the rows
    whose sink asks to. ``stopped_at[r]`` is the number of tokens row r kept when its sink
    stopped it (None: it ran to its end-of-turn token or the length limit)."""
    import torch
    from transformers import StoppingCriteria

    class RowHooks(StoppingCriteria):
        def __init__(self):
            self.ended = [sink is None for sink in sinks]
            self.stopped_at: list[int | None] = [None] * len(sinks)

        def __call__(self, input_ids, scores, **kwargs):
            produced = input_ids.shape[1] - prompt_len
            last = input_ids[:, -1].tolist()
            stop = [False] * len(sinks)
            for r, sink in enumerate(sinks):
                if self.ended[r]:
                    continue
                token: int | None = last[r]
                finish = None
                if token == end_id:
                    token, finish = None, "stop"
                elif produced >= max_new_tokens:
                    finish = "length"
                if sink(token, finish):
                    stop[r] = True
                    if finish is None:
                        self.stopped_at[r] = produced
                if finish is not None or stop[r]:
                    self.ended[r] = True
            return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)

    return RowHooks()


def _generate_batch(loaded, batch, adapter, max_new_tokens, temperature, top_p, stop, seed, sinks=None):
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
    hooks = None
    if sinks is not None and any(s is not None for s in sinks):
        from transformers import StoppingCriteriaList

        hooks = _row_hooks(sinks, enc["input_ids"].shape[1], tok.eos_token_id, max_new_tokens)
        kwargs["stopping_criteria"] = StoppingCriteriaList([hooks])
    with _selected(loaded, adapter) as model:
        started = time.perf_counter()
        out = model.generate(**enc, **kwargs)
        latency = time.perf_counter() - started
    prompt_len = enc["input_ids"].shape[1]
    results = []
    for r, (row, mask) in enumerate(zip(out, enc["attention_mask"], strict=True)):
        new = row[prompt_len:].tolist()
        finish = "length"
        kept = None if hooks is None else hooks.stopped_at[r]
        if kept is not None:  # its sink stopped it: what follows is padding
            new, finish = new[:kept], "stop"
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


def score_choices(
    loaded: LoadedModel,
    messages_batch: Sequence[Messages],
    choices_batch: Sequence[Sequence[str]],
    adapter: str | None = None,
) -> list[tuple[dict[str, float], int]]:
    """Log-probability of each allowed answer, normalised over the choices, per conversation.

    Every (conversation, choice) pair is scored in one left-padded forward pass: the choice's
    tokens are appended to the prompt and their log-probabilities summed. This is how a judge
    always yields a valid verdict, however small the model. Returns ``(logprobs, prompt_tokens)``.
    """
    import torch

    if adapter is not None and adapter not in loaded.internal:
        raise KeyError(f"adapter '{adapter}' is not loaded (loaded: {sorted(loaded.internal)})")
    tok = loaded.tokenizer
    prompts = [tok(tok.apply_chat_template(list(m), tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"] for m in messages_batch]
    choice_ids = [[tok(c, add_special_tokens=False)["input_ids"] for c in choices] for choices in choices_batch]
    for choices, ids in zip(choices_batch, choice_ids, strict=True):
        if not choices:
            raise ValueError("score_choices needs at least one choice per conversation")
        empty = [c for c, i in zip(choices, ids, strict=True) if not i]
        if empty:
            raise ValueError(f"choice(s) {empty} have no tokens")
    if all(len(i) == 1 for ids in choice_ids for i in ids):
        return _score_single_token_choices(loaded, prompts, choices_batch, choice_ids, adapter)
    seqs: list[list[int]] = []
    spans: list[tuple[int, int, int]] = []  # (request index, choice start, choice length)
    prompt_lens = [len(p) for p in prompts]
    for i, (p_ids, ids) in enumerate(zip(prompts, choice_ids, strict=True)):
        for c_ids in ids:
            seqs.append(p_ids + c_ids)
            spans.append((i, len(p_ids), len(c_ids)))
    input_ids, mask = _left_pad(seqs, tok.pad_token_id)
    width = input_ids.shape[1]
    logprobs = torch.log_softmax(_forward(loaded, input_ids, mask, adapter), dim=-1)
    totals: list[float] = []
    for r, (_i, _start, n) in enumerate(spans):
        seq_len = len(seqs[r])
        offset = width - seq_len
        # Token at absolute position t is predicted by the logits at t - 1.
        positions = range(offset + seq_len - n, offset + seq_len)
        totals.append(float(sum(logprobs[r, t - 1, input_ids[r, t]] for t in positions)))
    out: list[tuple[dict[str, float], int]] = []
    r = 0
    for i, choices in enumerate(choices_batch):
        raw = torch.tensor(totals[r : r + len(choices)])
        norm = torch.log_softmax(raw, dim=0).tolist()
        out.append(({c: float(v) for c, v in zip(choices, norm, strict=True)}, prompt_lens[i]))
        r += len(choices)
    return out


def _left_pad(seqs: Sequence[Sequence[int]], pad: int):
    import torch

    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        input_ids[r, width - len(s):] = torch.tensor(list(s))
        mask[r, width - len(s):] = 1
    return input_ids, mask


@contextlib.contextmanager
def _selected(loaded: LoadedModel, adapter: str | None):
    """Hold the model lock with ``adapter`` active (all adapters off for the base), no grad."""
    import torch

    with loaded.lock:
        from peft import PeftModel

        model = loaded.model
        if adapter is None and isinstance(model, PeftModel):
            ctx = model.disable_adapter()
        else:
            ctx = contextlib.nullcontext()
            if adapter is not None:
                model.set_adapter(loaded.internal[adapter])
        with ctx, torch.inference_mode():
            yield model


def _forward(loaded: LoadedModel, input_ids, mask, adapter: str | None, last_only: bool = False):
    """Logits of one forward pass with the adapter selected."""
    input_ids, mask = input_ids.to(loaded.device), mask.to(loaded.device)
    with _selected(loaded, adapter) as model:
        kwargs = {"logits_to_keep": 1} if last_only else {}
        return model(input_ids=input_ids, attention_mask=mask, **kwargs).logits.float()


MIN_SHARED_PREFIX = 32


def _last_logits(loaded: LoadedModel, prompts: Sequence[Sequence[int]], adapter: str | None):
    """Next-token logits after each prompt. Prompts that start alike (a judge's rubric and
    instructions) share one forward pass over the common prefix, whose KV cache is then
    repeated for the batch, so only each prompt's own tail is computed per row."""
    import torch

    shared = len(os.path.commonprefix([list(p) for p in prompts])) if len(prompts) > 1 else 0
    shared = min(shared, min(len(p) for p in prompts) - 1)  # every row keeps a token of its own
    if shared < MIN_SHARED_PREFIX:
        input_ids, mask = _left_pad(prompts, loaded.tokenizer.pad_token_id)
        return _forward(loaded, input_ids, mask, adapter, last_only=True)[:, -1, :]
    tails = [list(p[shared:]) for p in prompts]
    width = max(len(t) for t in tails)
    pad = loaded.tokenizer.pad_token_id
    # Right-padded tails: causal attention keeps real tokens from seeing the padding after them.
    ids = torch.tensor([t + [pad] * (width - len(t)) for t in tails], device=loaded.device)
    tail_mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in tails], device=loaded.device)
    batch = len(prompts)
    with _selected(loaded, adapter) as model:
        head = model(input_ids=torch.tensor([list(prompts[0][:shared])], device=loaded.device), use_cache=True)
        cache = head.past_key_values
        cache.batch_repeat_interleave(batch)
        mask = torch.cat([torch.ones((batch, shared), dtype=torch.long, device=loaded.device), tail_mask], dim=1)
        positions = torch.arange(shared, shared + width, device=loaded.device).unsqueeze(0).expand(batch, -1)
        logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache, position_ids=positions,
                       use_cache=True).logits.float()
    last = torch.tensor([len(t) - 1 for t in tails], device=loaded.device)
    return logits[torch.arange(batch, device=loaded.device), last]


def _score_single_token_choices(loaded, prompts, choices_batch, choice_ids, adapter):
    """Every choice is one token: one forward pass of the prompts, read at the last position."""
    import torch

    last = torch.log_softmax(_last_logits(loaded, prompts, adapter), dim=-1)
    out = []
    for r, (choices, ids) in enumerate(zip(choices_batch, choice_ids, strict=True)):
        raw = torch.stack([last[r, i[0]] for i in ids])
        norm = torch.log_softmax(raw, dim=0).tolist()
        out.append(({c: float(v) for c, v in zip(choices, norm, strict=True)}, len(prompts[r])))
    return out
