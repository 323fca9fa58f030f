"""Continuous (iteration-level) batching for one adapter: conversations join a running batch
between two decoding steps and leave it as soon as they end. ``batching.Batcher`` schedules
requests onto it."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from genops_assets.serving.adapters import LoadedModel, Messages, pin, selected, unpin
from genops_assets.serving.generation import GenerationResult, TokenSink
from genops_assets.serving.kv_cache import (
    buffered_layer_type,
    encode,
    left_pad,
    prefill,
    remember_prompts,
    start_cache,
)

DECODE_SPARE_COLUMNS = 64


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
    matcher: Any = None  # lib.constrained.RowMatcher of a row held to a JSON schema


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
        self.loaded, self.adapter = loaded, adapter
        self.internal = pin(loaded, adapter)
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
        internal, self.internal = self.internal, None
        if internal is not None:
            unpin(self.loaded, internal)

    def admit(self, keys: Sequence[Any], conversations: Sequence[Messages], *, max_new_tokens: Sequence[int],
              temperature: Sequence[float], top_p: Sequence[float], stop: Sequence[Sequence[str]],
              seeds: Sequence[int | None], sinks: Sequence[TokenSink | None],
              json_schemas: Sequence[Mapping[str, Any] | None] | None = None) -> list[tuple[Any, GenerationResult]]:
        """Prefill ``conversations`` and add them to the batch. Returns those already finished
        by their first token (end of turn, a one-token limit, or their sink stopping them).
        ``json_schemas`` (one per conversation, None: free) holds rows to JSON their schema accepts."""
        import torch

        from genops_assets.lib.constrained import schemas_for

        loaded, tok = self.loaded, self.loaded.tokenizer
        schemas = schemas_for(tok, list(json_schemas) if json_schemas is not None else None, len(keys))
        prompts = [encode(tok, m) for m in conversations]
        now = time.perf_counter()
        rows = []
        for i, key in enumerate(keys):
            gen = None
            if temperature[i] > 0:
                gen = torch.Generator(device=loaded.device)
                gen.manual_seed(seeds[i] if seeds[i] is not None else int.from_bytes(os.urandom(8), "little") >> 1)
            rows.append(_Row(key, len(prompts[i]), sinks[i], max(1, int(max_new_tokens[i])), float(temperature[i]),
                             float(top_p[i]), tuple(s for s in stop[i] if s), gen, now,
                             matcher=schemas[i].matcher() if schemas[i] is not None else None))
        with selected(loaded, self.adapter, self.internal) as model:
            shared, cache = start_cache(loaded, model, self.internal, prompts)
            input_ids, mask = left_pad(prompts, tok.pad_token_id, shared)
            input_ids, mask = input_ids.to(loaded.device), mask.to(loaded.device)
            out = prefill(model, input_ids, mask, shared, cache)
            remember_prompts(loaded, self.internal, prompts, out.cache, mask)
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
        with selected(self.loaded, self.adapter, self.internal) as model:
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

        from genops_assets.lib.constrained import mask_logits

        rows = self.rows[first:]
        if any(row.matcher is not None for row in rows):
            logits = logits.clone()  # the forward pass's output is an inference tensor (read-only)
            mask_logits(logits, [row.matcher for row in rows])
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
                if row.matcher is not None:
                    row.matcher.advance(token)
                if row.matcher is not None and row.matcher.complete:
                    finish = "stop"  # the JSON is complete: only the end of turn could follow
                elif len(row.tokens) >= row.max_new_tokens:
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
        layer_type = buffered_layer_type()
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
