"""Padding-free packed batches (lib/packing.py) against padded batches, on the tiny Llama with the
real tokenizer and the demo task's prompt (so the examples share a real system-prompt prefix)."""

from __future__ import annotations

from pathlib import Path

import pytest

from genops_assets.lib.packing import IGNORE_INDEX, pack_batch, sft_batching, shared_prefix_length
from genops_assets.lib.training import LoraTrainConfig, SftExample, to_lora_config, tokenize_example

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def rows(tokenizer):
    """Tokenized SFT rows of the demo task, rendered with its prompt as train_lora renders them."""
    from genops_assets.lib.formatting import build_messages, format_target
    from genops_assets.lib.tasks import load_task, read_raw_file

    task = load_task(ROOT / "tasks", "support_triage")
    raw = [r for f in task.raw_files() for r in read_raw_file(f, task)][:12]
    out = []
    for i, r in enumerate(raw):
        ex = SftExample(f"ex{i}", build_messages(task, r.input_text, contexts=r.contexts),
                        format_target(r.output, task.output_fields))
        out.append(tokenize_example(tokenizer, ex, 1024))
    return out


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    """The tiny Llama with LoRA adapters on every projection, B weights non-zero (so the adapters
    change the outputs), dropout off (so packed and padded runs are deterministic)."""
    import dataclasses

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = dataclasses.replace(to_lora_config(LoraTrainConfig(rank=4, alpha=8, dropout=0.0)), init_lora_weights=False)
    model = get_peft_model(model, lora)
    model.train()
    return model


def _padded(rows, pad_token_id):
    collator, _ = sft_batching(False, pad_token_id)
    return collator(rows)


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_examples_share_a_long_prefix_that_stops_before_every_answer(rows):
    prefix = shared_prefix_length(rows[:4])
    assert prefix > 50  # chat template + system prompt
    for r in rows[:4]:
        assert r["input_ids"][:prefix] == rows[0]["input_ids"][:prefix]
        assert all(label == IGNORE_INDEX for label in r["labels"][:prefix + 1])
    assert shared_prefix_length(rows[:1]) == 0


def test_packed_loss_and_gradients_equal_padded(lora_model, rows, tokenizer):
    import torch

    batch = rows[:4]
    packed = pack_batch(batch)
    padded = _padded(batch, tokenizer.pad_token_id)
    # one row, shorter than the padded batch: the prefix once, no padding
    assert packed["input_ids"].shape[0] == 1
    assert packed["input_ids"].shape[1] < sum(len(r["input_ids"]) for r in batch) < padded["input_ids"].numel()
    packed_loss, packed_grads = _loss_and_grads(lora_model, packed)
    padded_loss, padded_grads = _loss_and_grads(lora_model, padded)
    assert torch.isfinite(padded_loss)
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_attention_stays_inside_each_example(lora_model, rows):
    """Each example's logits in the packed row are those of the example run alone; changing
    another example of the batch changes nothing in it."""
    import torch

    batch = rows[4:7]
    packed = pack_batch(batch)
    prefix = shared_prefix_length(batch)
    with torch.no_grad():
        logits = lora_model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                            attention_mask=packed["attention_mask"]).logits[0]
        start = prefix
        for r in batch:
            alone = lora_model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
            own = torch.cat([logits[:prefix], logits[start:start + len(r["input_ids"]) - prefix]])
            torch.testing.assert_close(own, alone, rtol=1e-4, atol=1e-4)
            start += len(r["input_ids"]) - prefix
        # the middle example's own tokens replaced (same length): the other two do not move
        changed = [dict(r) for r in batch]
        ids = list(changed[1]["input_ids"])
        ids[prefix:-1] = [(t + 7) % 1000 + 100 for t in ids[prefix:-1]]
        changed[1]["input_ids"] = ids
        other = pack_batch(changed)
        assert shared_prefix_length(changed) == prefix
        logits2 = lora_model(input_ids=other["input_ids"], position_ids=other["position_ids"],
                             attention_mask=other["attention_mask"]).logits[0]
    seg = [-1] * prefix + [n for n, r in enumerate(batch) for _ in range(len(r["input_ids"]) - prefix)]
    untouched = torch.tensor([s != 1 for s in seg])
    torch.testing.assert_close(logits2[untouched], logits[untouched], rtol=0, atol=0)
    assert not torch.allclose(logits2[~untouched], logits[~untouched])


def test_answer_only_loss_mask_survives_packing(rows):
    """The packed targets are exactly each example's answer tokens (and its end-of-turn), in order:
    no prompt token and no token of a neighbouring example is ever a target."""
    batch = rows[:3]
    packed = pack_batch(batch)
    answers = [t for r in batch for t in r["labels"] if t != IGNORE_INDEX]
    assert packed["shift_labels"][0].tolist() == answers
    # each target is predicted from the token before it in its own example
    ids = packed["input_ids"][0]
    keep = packed["logits_to_keep"][0]
    positions = packed["position_ids"][0]
    kept_positions = positions[keep].tolist()
    expected = [i - 1 for r in batch for i, t in enumerate(r["labels"]) if t != IGNORE_INDEX]
    assert kept_positions == expected
    assert packed["logits_to_keep"].shape == packed["input_ids"].shape == (1, len(ids))


def test_identical_examples_share_only_their_prompt(lora_model, rows, tokenizer):
    """Two copies of one example share everything; the prefix still stops before the answer so
    both copies' answer tokens count (the loss equals the example's own loss)."""
    same = [rows[0], rows[0]]
    prefix = shared_prefix_length(same)
    first_answer = next(i for i, t in enumerate(rows[0]["labels"]) if t != IGNORE_INDEX)
    assert prefix == first_answer - 1
    packed = pack_batch(same)
    answers = [t for t in rows[0]["labels"] if t != IGNORE_INDEX]
    assert packed["shift_labels"][0].tolist() == answers * 2
    packed_loss, _ = _loss_and_grads(lora_model, packed)
    alone_loss, _ = _loss_and_grads(lora_model, _padded([rows[0]], tokenizer.pad_token_id))
    assert packed_loss.item() == pytest.approx(alone_loss.item(), rel=1e-5)


def test_padded_batches_are_length_grouped(tiny_model_dir, tmp_path):
    """packing=False: the Trainer's sampler puts rows of similar length together, so batches
    carry less padding than random ones."""
    import random

    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    rng = random.Random(0)
    lengths = [rng.randint(8, 200) for _ in range(256)]
    data = [{"input_ids": [5] * n, "attention_mask": [1] * n, "labels": [IGNORE_INDEX] * (n - 1) + [5]}
            for n in lengths]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    def padding_share(packing: bool, strategy: str | None = None) -> float:
        collator, sampling = sft_batching(packing, 0)
        args = TrainingArguments(output_dir=str(tmp_path / strategy if strategy else tmp_path / sampling),
                                 per_device_train_batch_size=8, train_sampling_strategy=strategy or sampling,
                                 use_cpu=True, report_to=[], remove_unused_columns=False, seed=0)
        loader = Trainer(model=model, args=args, train_dataset=data, data_collator=collator).get_train_dataloader()
        pad = total = 0
        for batch in loader:
            total += batch["input_ids"].numel()
            pad += int((batch["attention_mask"] == 0).sum()) if batch["attention_mask"].dim() == 2 else 0
        return pad / total

    assert sft_batching(False, 0)[1] == "group_by_length"
    grouped, random_order = padding_share(False), padding_share(False, "random")
    assert grouped < 0.1 < random_order
    assert sft_batching(True, 0)[1] == "random"  # packed rows carry no padding to group away


def test_training_benchmark_runs_both_sides_on_the_same_batches(tiny_model_dir, tmp_path):
    """The benchmark on the tiny model: both sides train on the same examples per step (same
    non-padding token count), report throughput, and end at nearly the same validation loss."""
    from genops_assets.bench.training import bench_training, summary
    from genops_assets.lib.tasks import load_task

    task = load_task(ROOT / "tasks", "support_triage")
    result = bench_training(str(tiny_model_dir), task, train=12, validation=4, steps=2, warmup=1, repeats=2,
                            batch_size=4, work=tmp_path, log=lambda _msg: None)
    runs = result["runs"]
    assert len(runs["naive"]) == len(runs["genops"]) == 2
    assert {r["tokens"] for r in runs["naive"]} == {r["tokens"] for r in runs["genops"]}
    for side in ("naive", "genops"):
        assert result[side]["tokens_per_s"] > 0 and result[side]["validation_loss"] > 0
    assert result["validation_loss_rel_diff"] < 0.01
    assert "x" in summary(result)


def test_throughput_counts_the_examples_tokens_not_the_packed_mask(rows, tokenizer):
    """The progress line's tokens/s: the examples' own tokens, whichever way they are batched
    (summing a packed batch's 2-D attention mask counts about length^2 / 2 per row)."""
    own = sum(len(r["input_ids"]) for r in rows)
    for packing in (True, False):
        collator, _ = sft_batching(packing, tokenizer.pad_token_id)
        batch = collator(rows)
        collator(rows[:1])
        assert collator.tokens == own + len(rows[0]["input_ids"])
        if packing:
            assert int(batch["attention_mask"].sum()) > 2 * own
