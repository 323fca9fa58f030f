"""KV caches of prompts: batched prompts laid out around a shared prefix, a prefix cache of
recent prompts within a byte budget, and a cache layer that grows in place while decoding.

The KV cache of the first k tokens of a prompt is the KV cache of those k tokens (attention is
causal), so any start of a cached prompt is reusable: the next turn of a conversation, a
judge's follow-up question, the next request with the same system prompt.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

from genops_assets.serving.adapters import LoadedModel, Messages

MIN_SHARED_PREFIX = 32
"""Prompts of a batch that start with at least this many equal tokens (a system prompt, a
judge's rubric) compute that prefix once; shorter common starts are not worth the extra call."""

PREFIX_CACHE_BYTES = 256 * 2**20
"""Bytes of KV cache the prefix cache keeps (least recently used dropped first; the newest
entry is always kept). SmolLM2-135M: about 46 KiB a token, so about 5,700 tokens."""


def chat_text(tok, messages: Messages) -> str:
    """A conversation in the model's chat template, ready for the answer (as text)."""
    return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def encode_text(tok, text: str) -> list[int]:
    """Token ids of a rendered conversation (``chat_text``); the template holds the special tokens."""
    return tok(text, add_special_tokens=False)["input_ids"]


def encode(tok, messages: Messages) -> list[int]:
    """Token ids of a conversation in the model's chat template, ready for the answer."""
    return encode_text(tok, chat_text(tok, messages))


def left_pad(seqs: Sequence[Sequence[int]], pad: int, shared: int = 0):
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


def shared_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the prefix worth sharing across ``prompts`` (0: none). Every row keeps at least
    one token of its own, so each row's next-token logits come from its own tail."""
    if len(prompts) < 2:
        return 0
    shared = len(os.path.commonprefix([list(p) for p in prompts]))
    shared = min(shared, min(len(p) for p in prompts) - 1)
    return shared if shared >= MIN_SHARED_PREFIX else 0


def prefix_cache(model, prefix: Sequence[int], batch: int, device: str, start=None, offset: int = 0):
    """KV cache of ``prefix`` computed once and repeated for ``batch`` rows; with ``start``
    (the one-row cache of the ``offset`` tokens before it) the prefix continues that cache."""
    import torch

    positions = torch.arange(offset, offset + len(prefix), device=device)[None]
    out = model(input_ids=torch.tensor([list(prefix)], device=device), cache=start, position_ids=positions,
                use_cache=True, logits_to_keep=1)
    cache = out.cache
    cache.batch_repeat_interleave(batch)
    return cache


def prefill(model, input_ids, mask, shared: int, cache):
    """Forward pass over the columns after the ``shared`` ones already in ``cache`` (none:
    ``shared`` 0, ``cache`` None), positions from the mask; logits of the last column only."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=input_ids[:, shared:], attention_mask=mask, cache=cache,
                 position_ids=positions[:, shared:], use_cache=True, logits_to_keep=1)


def _cache_from(layers, rows: int):
    """A cache holding the given one-row (keys, values) per layer, repeated for ``rows`` rows."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k.expand(rows, -1, -1, -1).contiguous(), v.expand(rows, -1, -1, -1).contiguous(), i)
    return cache


def _cached_prefix(loaded: LoadedModel, internal: str | None, prompts: Sequence[Sequence[int]]):
    """The longest start of a cached prompt that every prompt begins with (leaving each prompt
    a token of its own): (length, [(keys, values) per layer]) or (0, None); the entry used
    becomes the most recent. Call with the model lock held."""
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


def start_cache(loaded: LoadedModel, model, internal: str | None, prompts: Sequence[Sequence[int]]):
    """(shared, cache): the KV cache of the first ``shared`` tokens, which all ``prompts``
    have in common, one row per prompt, or (0, None). It starts from the longest cached
    prompt start and computes the rest of the common start once (not once per row)."""
    cached, layers = _cached_prefix(loaded, internal, prompts)
    shared = max(cached, shared_prefix_len(prompts))
    if not shared:
        return 0, None
    if shared > cached:
        start = _cache_from(layers, 1) if cached else None
        return shared, prefix_cache(model, prompts[0][cached:shared], len(prompts), loaded.device, start, cached)
    return shared, _cache_from(layers, len(prompts))


def kv_bytes(layers) -> int:
    return sum(k.nelement() * k.element_size() + v.nelement() * v.element_size() for k, v in layers)


def remember_prompts(loaded: LoadedModel, internal: str | None, prompts: Sequence[Sequence[int]], cache,
                     mask) -> None:
    """Keep each prompt's KV cache (its row of ``cache`` at the columns ``mask`` marks) for
    later requests that begin the same way. A prompt that starts a kept one only refreshes
    that one; kept ones that start it are replaced by it. Entries of adapters no longer loaded
    are dropped, then the least recently used beyond PREFIX_CACHE_BYTES. Call with the model
    lock held."""
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
    total = sum(kv_bytes(e[2]) for e in kept)
    while len(kept) > 1 and total > PREFIX_CACHE_BYTES:
        total -= kv_bytes(kept.pop(0)[2])
    loaded.prefixes = kept


@functools.cache
def buffered_layer_type():
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
