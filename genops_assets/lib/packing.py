"""Padding-free SFT batches: the examples of a batch packed into one row, sharing their prompt prefix.

The examples of a task share a long start (chat template, system prompt, the user template's
opening words; about 60% of the tokens of the demo task). A padded batch computes that start
once per example, pads every row to the longest one and projects every position onto the
vocabulary, though only the answer tokens carry a loss.
``pack_batch`` lays a batch out as one row ``[shared prefix][rest of example 1][rest of
example 2]...`` and gives the model what keeps each example's computation its own:

* ``position_ids``: each example's rest continues at the prefix length, so every token has the
  rotary position it has when the example runs alone;
* a 4D boolean attention mask: a token attends to the shared prefix and to the earlier tokens of
  its own example, never to another example (block-diagonal causal, with the prefix as a
  column every block sees);
* ``shift_labels``: the next-token target of each position within its own example (the model's
  own one-position shift would cross example boundaries), ``-100`` on prompt tokens;
* ``logits_to_keep``: the positions with a target, so the vocabulary projection and the
  cross-entropy run on answer tokens only (the loss ignores the others anyway).

The loss of a packed batch equals the loss of the same examples padded and run together
(tests/test_packing.py); the gradient flows into the shared prefix from every example, as the
sum of the per-example gradients through their own copies would. Dropout is the one difference:
the prefix draws one dropout mask for all examples instead of one each.

The prefix stops before the first answer token of any example (so it predicts no answer token
and the answer-only loss survives) and is used only when it is at least ``min_shared`` tokens.

Attention here is dense over the packed row (the mask removes what must not be seen): cheap at
the lengths SFT examples have, quadratic in the packed length. With ``packing`` off, batches are
padded and the Trainer's length-grouped sampler keeps rows of similar length together
(``sft_batching``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

IGNORE_INDEX = -100
MIN_SHARED = 8


def shared_prefix_length(rows: Sequence[dict[str, list[int]]], min_shared: int = MIN_SHARED) -> int:
    """How many leading tokens every row of the batch shares and can compute once: at most the
    common prefix, strictly before any row's first answer token, leaving every row at least one
    token of its own; 0 when that is shorter than ``min_shared`` or the batch has one row."""
    if len(rows) < 2:
        return 0
    common = len(os.path.commonprefix([r["input_ids"] for r in rows]))
    for r in rows:
        first_answer = next((i for i, lab in enumerate(r["labels"]) if lab != IGNORE_INDEX), len(r["labels"]))
        common = min(common, first_answer - 1, len(r["input_ids"]) - 1)
    return common if common >= min_shared else 0


def pack_batch(rows: Sequence[dict[str, list[int]]], min_shared: int = MIN_SHARED) -> dict[str, Any]:
    """One packed row (see the module docstring) for ``rows`` of tokenized examples
    (``input_ids`` and ``labels`` of equal length, prompt labels ``-100``)."""
    import torch

    if not rows:
        raise ValueError("pack_batch: no rows")
    for n, r in enumerate(rows):
        if len(r["input_ids"]) != len(r["labels"]) or not r["input_ids"]:
            raise ValueError(f"pack_batch: row {n} has {len(r['input_ids'])} input_ids and {len(r['labels'])} labels")
    prefix = shared_prefix_length(rows, min_shared)
    ids: list[int] = list(rows[0]["input_ids"][:prefix])
    positions: list[int] = list(range(prefix))
    segments: list[int] = [-1] * prefix
    targets: list[int] = [IGNORE_INDEX] * prefix  # the prefix stops before every answer
    for n, r in enumerate(rows):
        own_ids, labels = r["input_ids"], r["labels"]
        ids += own_ids[prefix:]
        positions += range(prefix, len(own_ids))
        segments += [n] * (len(own_ids) - prefix)
        targets += [*labels[prefix + 1:], IGNORE_INDEX]
    seg = torch.tensor(segments)
    length = len(ids)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    visible = (seg[:, None] == seg[None, :]) | (seg[None, :] == -1)
    shift = torch.tensor([targets])
    keep = shift != IGNORE_INDEX
    return {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.tensor([positions]),
        "attention_mask": (causal & visible)[None, None],
        "labels": shift,  # read by the Trainer's token count only; the loss uses shift_labels
        "shift_labels": shift[keep][None],
        "logits_to_keep": keep,
        "use_cache": False,  # training: no key/value cache to build
    }


class PackedCollator:
    """Data collator for the Trainer: a list of tokenized rows -> one packed row."""

    def __init__(self, min_shared: int = MIN_SHARED) -> None:
        self.min_shared = min_shared

    def __call__(self, rows: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
        return pack_batch(rows, self.min_shared)


class CountingCollator:
    """A data collator that also counts the examples' own tokens it has batched (the
    non-padding tokens, each example's shared prompt start included once per example): the
    throughput a progress line reports, the same whether batches are packed or padded. The
    Trainer's own count sums the attention mask, which a packed batch carries as a 2-D mask."""

    def __init__(self, inner) -> None:
        self.inner, self.tokens = inner, 0

    def __call__(self, rows: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
        self.tokens += sum(len(row["input_ids"]) for row in rows)
        return self.inner(rows)


def sft_batching(packing: bool, pad_token_id: int) -> tuple[Any, str]:
    """How train_lora turns tokenized rows into batches: the data collator and the Trainer's
    ``train_sampling_strategy``. Packed: one packed row per batch, examples drawn at random
    (padding-free, so grouping by length saves nothing). Padded: TRL's collator pads each batch
    to its longest row, and the Trainer's length-grouped sampler keeps rows of similar length
    together so the padding stays small."""
    if packing:
        return CountingCollator(PackedCollator()), "random"
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return CountingCollator(DataCollatorForLanguageModeling(pad_token_id=pad_token_id)), "group_by_length"
