"""Batched chat generation on a Hugging Face causal LM with any number of LoRA adapters.

One base model stays in memory; adapters are loaded beside it under served names and
selected per batch (the base itself answers with the adapters disabled). Adapters can be
added or replaced while serving: the new weights are loaded under a fresh internal name and
swapped in under the lock, so a request never sees a half-loaded adapter.
"""

from __future__ import annotations

import contextlib
import functools
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
    # peft adapters a running decode batch still uses (internal name -> users); a replaced or
    # removed adapter that is pinned is deleted only when its last batch lets go of it
    pinned: dict[str, int] = field(default_factory=dict)
    retired: set[str] = field(default_factory=set)
    # KV caches of recent prompts (generation and choice scoring), most recently used last:
    # (peft adapter or None, prompt tokens, [(keys, values) per layer] of one row)
    prefixes: list[tuple[str | None, tuple[int, ...], list]] = field(default_factory=list)


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
    if loaded.pinned.get(internal):
        loaded.retired.add(internal)
        return
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


def _encode(tok, messages: Messages) -> list[int]:
    """Token ids of a conversation in the model's chat template, ready for the answer."""
    return tok(tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]


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
    prompts = [_encode(tok, m) for m in batch]
    shared = _shared_prefix_len(prompts)
    input_ids, attention_mask = _left_pad(prompts, tok.pad_token_id, shared)
    input_ids, attention_mask = input_ids.to(loaded.device), attention_mask.to(loaded.device)
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
    prompt_len = input_ids.shape[1]
    hooks = None
    if sinks is not None and any(s is not None for s in sinks):
        from transformers import StoppingCriteriaList

        hooks = _row_hooks(sinks, prompt_len, tok.eos_token_id, max_new_tokens)
        kwargs["stopping_criteria"] = StoppingCriteriaList([hooks])
    with _selected(loaded, adapter) as model:
        started = time.perf_counter()
        if shared:
            # generate() continues from the cache: it runs only the columns after the prefix.
            kwargs["cache"] = _prefix_cache(model, prompts[0][:shared], len(prompts), loaded.device)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        latency = time.perf_counter() - started
    results = []
    for r, (row, mask) in enumerate(zip(out, attention_mask, strict=True)):
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
    prompts = [_encode(tok, m) for m in messages_batch]
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


def _left_pad(seqs: Sequence[Sequence[int]], pad: int, shared: int = 0):
    """Rows laid out as ``shared prefix | padding | own tail``, so that every row ends in the
    last column (its next token is read there). With ``shared`` > 0 the prefix sits at the same
    columns in every row, so its KV cache is computed once; masked padding in the middle
    leaves the positions that generate() derives from the mask (its cumulative sum) unchanged."""
    import torch

    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        tail = len(s) - shared
        input_ids[r, :shared] = torch.tensor(list(s[:shared]))
        input_ids[r, width - tail:] = torch.tensor(list(s[shared:]))
        mask[r, :shared] = 1
        mask[r, width - tail:] = 1
    return input_ids, mask


@contextlib.contextmanager
def _selected(loaded: LoadedModel, adapter: str | None, internal: str | None = None):
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


def _forward(loaded: LoadedModel, input_ids, mask, adapter: str | None):
    """Logits of one forward pass with the adapter selected (every column)."""
    input_ids, mask = input_ids.to(loaded.device), mask.to(loaded.device)
    with _selected(loaded, adapter) as model:
        return model(input_ids=input_ids, attention_mask=mask).logits.float()


MIN_SHARED_PREFIX = 32
"""Prompts of a batch that start with at least this many equal tokens (a system prompt, a
judge's rubric) compute that prefix once; shorter common starts are not worth the extra call."""


def _shared_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the prefix worth sharing across ``prompts`` (0: none). Every row keeps at least
    one token of its own, so each row's next-token logits come from its own tail."""
    if len(prompts) < 2:
        return 0
    shared = len(os.path.commonprefix([list(p) for p in prompts]))
    shared = min(shared, min(len(p) for p in prompts) - 1)
    return shared if shared >= MIN_SHARED_PREFIX else 0


def _prefix_cache(model, prefix: Sequence[int], batch: int, device: str, start=None, offset: int = 0):
    """KV cache of ``prefix`` computed once and repeated for ``batch`` rows; with ``start``
    (the one-row cache of the ``offset`` tokens before it) the prefix continues that cache."""
    import torch

    positions = torch.arange(offset, offset + len(prefix), device=device)[None]
    out = model(input_ids=torch.tensor([list(prefix)], device=device), cache=start, position_ids=positions,
                use_cache=True, logits_to_keep=1)
    cache = out.cache
    cache.batch_repeat_interleave(batch)
    return cache


def _prefill(model, input_ids, mask, shared: int, cache):
    """Forward pass over the columns after the ``shared`` ones already in ``cache`` (none:
    ``shared`` 0, ``cache`` None), positions from the mask; logits of the last column only."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=input_ids[:, shared:], attention_mask=mask, cache=cache,
                 position_ids=positions[:, shared:], use_cache=True, logits_to_keep=1)


def _last_logits(loaded: LoadedModel, prompts: Sequence[Sequence[int]], adapter: str | None):
    """Next-token logits after each prompt. A start already in the prefix cache (a judge's
    rubric seen before) is not computed again; prompts that start alike compute their common
    start once; only the last column goes through the output layer. Each prompt's KV cache is
    kept for the requests that continue it (a judge's follow-up question for its explanation)."""
    with _selected(loaded, adapter) as model:
        internal = loaded.internal[adapter] if adapter is not None else None
        shared, cache = _start_cache(loaded, model, internal, prompts)
        input_ids, mask = _left_pad(prompts, loaded.tokenizer.pad_token_id, shared)
        input_ids, mask = input_ids.to(loaded.device), mask.to(loaded.device)
        out = _prefill(model, input_ids, mask, shared, cache)
        _remember_prompts(loaded, internal, prompts, out.cache, mask)
    return out.logits[:, -1, :].float()


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


def _cache_from(layers, rows: int):
    """A cache holding the given one-row (keys, values) per layer, repeated for ``rows`` rows."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k.expand(rows, -1, -1, -1).contiguous(), v.expand(rows, -1, -1, -1).contiguous(), i)
    return cache


@functools.cache
def _buffered_layer_type():
    """A KV-cache layer that appends in place into spare capacity (doubling when full), where
    the default layer concatenates, copying the whole cache at every decoding step."""
    from transformers.cache_utils import DynamicLayer

    class BufferedLayer(DynamicLayer):
        def __init__(self, keys, values, spare: int):
            super().__init__()
            self.is_initialized, self.device = True, keys.device
            self._store(keys, values, spare)

        def _store(self, keys, values, spare: int) -> None:
            b, h, n, d = keys.shape
            self._k = keys.new_empty((b, h, n + spare, d))
            self._v = values.new_empty((b, values.shape[1], n + spare, values.shape[3]))
            self._k[:, :, :n] = keys
            self._v[:, :, :n] = values
            self._n = n
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[-2]
            if self._n + n > self._k.shape[2]:
                self._store(self.keys, self.values, max(n, self._n))
            self._k[:, :, self._n:self._n + n] = key_states
            self._v[:, :, self._n:self._n + n] = value_states
            self._n += n
            self.keys, self.values = self._k[:, :, :self._n], self._v[:, :, :self._n]
            return self.keys, self.values

    return BufferedLayer


DECODE_SPARE_COLUMNS = 64
PREFIX_CACHE_BYTES = 256 * 2**20
"""Bytes of KV cache the prefix cache keeps (least recently used dropped first; the newest
entry is always kept). SmolLM2-135M: about 46 KiB a token, so about 5,700 tokens."""


def _cached_prefix(loaded: LoadedModel, internal: str | None, prompts: Sequence[Sequence[int]]):
    """The longest start of a cached prompt that every prompt begins with (leaving each prompt
    a token of its own): (length, [(keys, values) per layer]) or (0, None); the entry used
    becomes the most recent. The KV cache of the first k tokens of a prompt is the KV cache of
    those k tokens (attention is causal), so any start of a cached prompt is reusable.
    Call with the model lock held."""
    best, at = 0, None
    limit = min(len(p) for p in prompts) - 1
    for i, (owner, tokens, _layers) in enumerate(loaded.prefixes):
        if owner != internal:
            continue
        k = min([limit, *(len(os.path.commonprefix([tokens, tuple(p)])) for p in prompts)])
        if k > best:
            best, at = k, i
    if best < MIN_SHARED_PREFIX:
        return 0, None
    entry = loaded.prefixes.pop(at)
    loaded.prefixes.append(entry)
    return best, [(k_[:, :, :best], v_[:, :, :best]) for k_, v_ in entry[2]]


def _start_cache(loaded: LoadedModel, model, internal: str | None, prompts: Sequence[Sequence[int]]):
    """(shared, cache): the KV cache of the first ``shared`` tokens, which all ``prompts``
    have in common, one row per prompt, or (0, None). It starts from the longest cached
    prompt start and computes the rest of the common start once (not once per row)."""
    cached, layers = _cached_prefix(loaded, internal, prompts)
    shared = max(cached, _shared_prefix_len(prompts))
    if not shared:
        return 0, None
    if shared > cached:
        start = _cache_from(layers, 1) if cached else None
        return shared, _prefix_cache(model, prompts[0][cached:shared], len(prompts), loaded.device, start, cached)
    return shared, _cache_from(layers, len(prompts))


def _kv_bytes(layers) -> int:
    return sum(k.nelement() * k.element_size() + v.nelement() * v.element_size() for k, v in layers)


def _remember_prompts(loaded: LoadedModel, internal: str | None, prompts: Sequence[Sequence[int]], cache,
                      mask) -> None:
    """Keep each prompt's KV cache (its row of ``cache`` at the columns ``mask`` marks) for
    later requests that begin the same way: the next turn of a conversation, a judge's
    follow-up question, the next request with the same system prompt. A prompt that starts a
    kept one only refreshes that one; kept ones that start it are replaced by it. Entries of
    adapters no longer loaded are dropped, then the least recently used beyond
    PREFIX_CACHE_BYTES. Call with the model lock held."""
    new = []
    for r, p in enumerate(prompts):
        if len(p) < MIN_SHARED_PREFIX:
            continue
        columns = mask[r].nonzero().squeeze(-1)
        new.append((tuple(p), [(layer.keys[r:r + 1].index_select(2, columns),
                                layer.values[r:r + 1].index_select(2, columns)) for layer in cache.layers]))
    if not new:
        return
    live = set(loaded.internal.values())
    kept = [e for e in loaded.prefixes if e[0] is None or e[0] in live]
    for tokens, layers in new:
        mine = [i for i, (owner, t, _) in enumerate(kept) if owner == internal and t[:len(tokens)] == tokens]
        if mine:
            kept.append(kept.pop(mine[0]))
            continue
        kept = [e for e in kept if not (e[0] == internal and tokens[:len(e[1])] == e[1])]
        kept.append((internal, tokens, layers))
    total = sum(_kv_bytes(e[2]) for e in kept)
    while len(kept) > 1 and total > PREFIX_CACHE_BYTES:
        total -= _kv_bytes(kept.pop(0)[2])
    loaded.prefixes = kept


@dataclass(eq=False)
class _Row:
    key: Any  # the caller's handle for this conversation
    prompt_tokens: int
    sink: TokenSink | None
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    generator: Any  # torch.Generator for sampled rows
    started: float
    tokens: list[int] = field(default_factory=list)


class DecodeBatch:
    """Continuous (iteration-level) batching for one adapter: conversations join a running
    batch between two decoding steps and leave it as soon as they end, so a new request never
    waits for a whole batch to finish, and the batch stays full under load.

    Joining conversations are prefilled together (sharing a common prefix's KV cache when they
    have one) and their caches are merged into the running one, left-padded to a common length;
    attention masks hide the padding and each row keeps its own position ids. Rows that end
    are dropped from the cache, and columns that only padding occupies are trimmed.

    Greedy rows pick the arg-max token; sampled rows draw from their own generator with
    temperature and top-p. The batch pins the adapter version it started with: a hot reload
    mid-way does not change the weights under a running conversation. Not thread-safe: one
    scheduler thread drives it; the model lock is held only during each forward pass."""

    def __init__(self, loaded: LoadedModel, adapter: str | None):
        if adapter is not None and adapter not in loaded.internal:
            raise KeyError(f"adapter '{adapter}' is not loaded (loaded: {sorted(loaded.internal)})")
        self.loaded, self.adapter = loaded, adapter
        with loaded.lock:
            self.internal = loaded.internal[adapter] if adapter is not None else None
            if self.internal is not None:
                loaded.pinned[self.internal] = loaded.pinned.get(self.internal, 0) + 1
        self.rows: list[_Row] = []
        self.cache = None
        self.mask = None  # [rows, columns] 1 where the cache holds a real token
        self.positions = None  # [rows] position id of each row's next token
        self.last = None  # [rows] token each row feeds to the next step

    def __len__(self) -> int:
        return len(self.rows)

    def current(self) -> bool:
        """Whether the adapter this batch pinned is still the one served under its name."""
        return self.internal == (self.loaded.internal.get(self.adapter) if self.adapter is not None else None)

    def close(self) -> None:
        """Let go of the pinned adapter (deleted now if it was replaced meanwhile)."""
        loaded, internal = self.loaded, self.internal
        self.internal = None
        if internal is None:
            return
        with loaded.lock:
            loaded.pinned[internal] -= 1
            if not loaded.pinned[internal]:
                del loaded.pinned[internal]
                if internal in loaded.retired and internal not in loaded.internal.values():
                    loaded.retired.discard(internal)
                    _delete(loaded, internal)

    def admit(self, keys: Sequence[Any], conversations: Sequence[Messages], *, max_new_tokens: Sequence[int],
              temperature: Sequence[float], top_p: Sequence[float], stop: Sequence[Sequence[str]],
              seeds: Sequence[int | None], sinks: Sequence[TokenSink | None]) -> list[tuple[Any, GenerationResult]]:
        """Prefill ``conversations`` and add them to the batch. Returns those already finished
        by their first token (end of turn, a one-token limit, or their sink stopping them)."""
        import torch

        loaded, tok = self.loaded, self.loaded.tokenizer
        prompts = [_encode(tok, m) for m in conversations]
        now = time.perf_counter()
        rows = []
        for i, key in enumerate(keys):
            gen = None
            if temperature[i] > 0:
                gen = torch.Generator(device=loaded.device)
                gen.manual_seed(seeds[i] if seeds[i] is not None else int.from_bytes(os.urandom(8), "little") >> 1)
            rows.append(_Row(key, len(prompts[i]), sinks[i], max(1, int(max_new_tokens[i])), float(temperature[i]),
                             float(top_p[i]), tuple(s for s in stop[i] if s), gen, now))
        with _selected(loaded, self.adapter, self.internal) as model:
            shared, cache = _start_cache(loaded, model, self.internal, prompts)
            input_ids, mask = _left_pad(prompts, tok.pad_token_id, shared)
            input_ids, mask = input_ids.to(loaded.device), mask.to(loaded.device)
            out = _prefill(model, input_ids, mask, shared, cache)
            _remember_prompts(loaded, self.internal, prompts, out.cache, mask)
        next_positions = mask.sum(-1)
        self._merge(out.cache, mask, next_positions, rows)
        return self._advance(out.logits[:, -1, :].float(), first=len(self.rows) - len(rows))

    def step(self) -> list[tuple[Any, GenerationResult]]:
        """One decoding step for every row; returns the conversations that ended."""
        import torch

        if not self.rows:
            return []
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.mask.device)
        mask = torch.cat([self.mask, ones], dim=1)
        with _selected(self.loaded, self.adapter, self.internal) as model:
            out = model(input_ids=self.last[:, None], attention_mask=mask, position_ids=self.positions[:, None],
                        cache=self.cache, use_cache=True)
        self.mask, self.cache = mask, out.cache
        self.positions = self.positions + 1
        return self._advance(out.logits[:, -1, :].float(), first=0)

    def _merge(self, cache, mask, positions, rows: list[_Row]) -> None:
        import torch
        import torch.nn.functional as F

        last = torch.zeros(len(rows), dtype=torch.long, device=mask.device)
        if not self.rows:
            self.cache, self.mask, self.positions, self.last = cache, mask, positions, last
            self.rows = list(rows)
            self._rebuffer([(layer.keys, layer.values) for layer in cache.layers])
            return
        width = max(self.mask.shape[1], mask.shape[1])

        def left(t, extra):  # pad the sequence dimension (second to last for K/V, last for masks)
            if not extra:
                return t
            return F.pad(t, (0, 0, extra, 0)) if t.dim() == 4 else F.pad(t, (extra, 0))

        a, b = width - self.mask.shape[1], width - mask.shape[1]
        self._rebuffer([(torch.cat([left(mine.keys, a), left(theirs.keys, b)], dim=0),
                         torch.cat([left(mine.values, a), left(theirs.values, b)], dim=0))
                        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True)])
        self.mask = torch.cat([left(self.mask, a), left(mask, b)], dim=0)
        self.positions = torch.cat([self.positions, positions])
        self.last = torch.cat([self.last, last])
        self.rows.extend(rows)

    def _advance(self, logits, first: int) -> list[tuple[Any, GenerationResult]]:
        """Pick each row's next token from ``logits`` (rows ``first``.. of the batch), feed
        the sinks, and drop the rows that ended."""
        import torch

        rows = self.rows[first:]
        chosen = logits.argmax(dim=-1)
        for r, row in enumerate(rows):
            if row.temperature > 0:
                chosen[r] = _sample(logits[r], row.temperature, row.top_p, row.generator)
        tokens = chosen.tolist()
        end_id = self.loaded.tokenizer.eos_token_id
        ended: list[tuple[int, str]] = []
        for r, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            finish = None
            if token == end_id:
                finish = "stop"
            else:
                row.tokens.append(token)
                if len(row.tokens) >= row.max_new_tokens:
                    finish = "length"
            if row.sink is not None and row.sink(None if token == end_id else token, finish) and finish is None:
                finish = "stop"
            if finish is not None:
                ended.append((first + r, finish))
        self.last[first:] = chosen
        if not ended:
            return []
        done = []
        gone = {i for i, _ in ended}
        for i, finish in ended:
            done.append((self.rows[i].key, self._result(self.rows[i], finish)))
        keep = [i for i in range(len(self.rows)) if i not in gone]
        self._keep(keep)
        return done

    def _keep(self, keep: list[int]) -> None:
        import torch

        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.positions = self.last = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(dim=0).long().argmax())  # first column a remaining row still uses
        self._rebuffer([(layer.keys.index_select(0, index)[:, :, start:, :],
                         layer.values.index_select(0, index)[:, :, start:, :]) for layer in self.cache.layers])
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, index)
        self.last = self.last.index_select(0, index)

    def _rebuffer(self, kv) -> None:
        """Hold the cache in buffered layers with room for the next steps."""
        layer_type = _buffered_layer_type()
        self.cache.layers = [layer_type(k, v, DECODE_SPARE_COLUMNS) for k, v in kv]

    def _result(self, row: _Row, finish: str) -> GenerationResult:
        text = self.loaded.tokenizer.decode(row.tokens, skip_special_tokens=True)
        for s in row.stop:
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        return GenerationResult(text=text.strip(), prompt_tokens=row.prompt_tokens,
                                completion_tokens=len(row.tokens), latency_s=time.perf_counter() - row.started,
                                finish_reason=finish)


def _sample(logits, temperature: float, top_p: float, generator):
    """One token drawn from ``softmax(logits / temperature)`` restricted to the top-p nucleus."""
    import torch

    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # the top token always stays
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        pick = torch.multinomial(sorted_probs, 1, generator=generator)
        return order[pick].squeeze()
    return torch.multinomial(probs, 1, generator=generator).squeeze()
