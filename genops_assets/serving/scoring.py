"""Choice scoring: the log-probability of each allowed answer, normalised over the choices.

This is how a judge always yields a valid verdict, however small the model (vLLM's
``guided_choice``, answered by scoring instead of constrained decoding)."""

from __future__ import annotations

from collections.abc import Sequence

from genops_assets.serving.adapters import LoadedModel, Messages, selected
from genops_assets.serving.kv_cache import encode, left_pad, prefill, remember_prompts, start_cache


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

    loaded.internal_name(adapter)  # a clear error for an adapter that is not loaded
    tok = loaded.tokenizer
    prompts = [encode(tok, m) for m in messages_batch]
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
    input_ids, mask = left_pad(seqs, tok.pad_token_id)
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


def _forward(loaded: LoadedModel, input_ids, mask, adapter: str | None):
    """Logits of one forward pass with the adapter selected (every column)."""
    input_ids, mask = input_ids.to(loaded.device), mask.to(loaded.device)
    with selected(loaded, adapter) as model:
        return model(input_ids=input_ids, attention_mask=mask).logits.float()


def _last_logits(loaded: LoadedModel, prompts: Sequence[Sequence[int]], adapter: str | None):
    """Next-token logits after each prompt. A start already in the prefix cache (a judge's
    rubric seen before) is not computed again; prompts that start alike compute their common
    start once; only the last column goes through the output layer. Each prompt's KV cache is
    kept for the requests that continue it (a judge's follow-up question for its explanation)."""
    with selected(loaded, adapter) as model:
        internal = loaded.internal[adapter] if adapter is not None else None
        shared, cache = start_cache(loaded, model, internal, prompts)
        input_ids, mask = left_pad(prompts, loaded.tokenizer.pad_token_id, shared)
        input_ids, mask = input_ids.to(loaded.device), mask.to(loaded.device)
        out = prefill(model, input_ids, mask, shared, cache)
        remember_prompts(loaded, internal, prompts, out.cache, mask)
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
