"""Static batched chat generation: each batch of conversations runs to its end in one
``generate`` call of transformers (the "static" scheduler, seeded samples, offline evaluation).
Continuous batching, where conversations join and leave a running batch, is ``decode``."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from genops_assets.serving.adapters import LoadedModel, Messages, selected
from genops_assets.serving.kv_cache import encode, left_pad, prefix_cache, shared_prefix_len

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
    json_schema: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None,
) -> list[GenerationResult]:
    """Answer each conversation; greedy when ``temperature`` is 0. ``adapter=None`` is the base.

    ``json_schema`` constrains the answers to JSON that the schema accepts (``lib.constrained``):
    one schema for every conversation, or a list with one schema (or None: unconstrained) per
    conversation. Unconstrained rows are decoded exactly as without it.

    ``token_sinks`` (one per conversation, ``None`` for none) receive each token as it is
    decoded; a conversation whose sink asks to stop ends there (its result holds the tokens
    generated until then, finish reason "stop") while the others continue."""
    loaded.internal_name(adapter)  # a clear error for an adapter that is not loaded
    if token_sinks is not None and len(token_sinks) != len(messages_batch):
        raise ValueError(f"token_sinks has {len(token_sinks)} entries for {len(messages_batch)} conversations")
    from genops_assets.lib.constrained import schemas_for

    schemas = schemas_for(loaded.tokenizer, json_schema, len(messages_batch))
    results: list[GenerationResult] = []
    step = max(1, batch_size)
    for start in range(0, len(messages_batch), step):
        sinks = None if token_sinks is None else list(token_sinks[start : start + step])
        results.extend(_generate_batch(loaded, messages_batch[start : start + step], adapter,
                                       max_new_tokens, temperature, top_p, list(stop or []), seed, sinks,
                                       schemas[start : start + step]))
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


def _schema_mask(schemas, prompt_len: int, end_id: int, hooks):
    """A logits processor that keeps each constrained row inside its schema: it feeds the row's
    matcher the token chosen at the previous step, then masks the row's next-token logits.
    Rows that ended (end of turn, stopped by their sink) are left alone."""
    from transformers import LogitsProcessor

    from genops_assets.lib.constrained import mask_logits

    class SchemaMask(LogitsProcessor):
        def __init__(self):
            self.matchers = [s.matcher() if s is not None else None for s in schemas]

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] > prompt_len:
                for r, token in enumerate(input_ids[:, -1].tolist()):
                    m = self.matchers[r]
                    if m is None:
                        continue
                    if token == end_id or (hooks is not None and hooks.stopped_at[r] is not None):
                        self.matchers[r] = None  # the row ended: padding follows
                    else:
                        m.advance(token)
            mask_logits(scores, self.matchers)
            return scores

    return SchemaMask()


def _generate_batch(loaded, batch, adapter, max_new_tokens, temperature, top_p, stop, seed, sinks=None,
                    schemas=None):
    import torch

    tok = loaded.tokenizer
    prompts = [encode(tok, m) for m in batch]
    shared = shared_prefix_len(prompts)
    input_ids, attention_mask = left_pad(prompts, tok.pad_token_id, shared)
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
    if schemas and any(s is not None for s in schemas):
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList([_schema_mask(schemas, prompt_len, tok.eos_token_id,
                                                                       hooks)])
    with selected(loaded, adapter) as model:
        started = time.perf_counter()
        if shared:
            # generate() continues from the cache: it runs only the columns after the prefix.
            kwargs["cache"] = prefix_cache(model, prompts[0][:shared], len(prompts), loaded.device)
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
