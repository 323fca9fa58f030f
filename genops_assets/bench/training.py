"""Training speed: genops' SFT step against a naive Hugging Face Trainer + PEFT loop.

    python -m genops_assets.bench.training [--quick] [--steps 12] [--repeats 3] [--base DIR]

Both sides train the same LoRA (``LoraTrainConfig`` defaults: rank, modules, learning rate,
schedule) from the same seed on the same rows (the task's SFT examples rendered with its prompt
and tokenized by ``tokenize_example``), for the same optimizer steps, with the same Trainer
arguments and the same random batch order, so each step sees the same examples on both sides.
They differ only in how rows become batches:

* naive: ``DataCollatorForSeq2Seq`` pads every batch to its longest row, and the model computes
  logits (vocabulary projection and cross-entropy) at every position;
* genops: ``lib/packing.py`` as ``train_lora`` uses it (``sft_batching(packing=True)``): one
  padding-free row per batch, the shared prompt prefix computed once, logits at answer positions
  only.

The sides alternate (naive first in even repeats, genops first in odd ones); the first
``warmup`` steps of every run are not timed. Throughput is non-padding tokens (the examples'
own tokens, the same count on both sides) per second of wall time, and per second of this
process' CPU time (steadier on a shared machine); the medians over repeats are compared. After
training, both adapters' validation loss (token-weighted mean over the answer tokens of the
validation examples, one padded evaluation for both) must agree within 1%.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TARGET_RATIO = 1.5
LOSS_TOLERANCE = 0.01
QUICK = {"train": 32, "validation": 16, "steps": 3, "warmup": 1, "repeats": 2}
FULL = {"train": 160, "validation": 64, "steps": 12, "warmup": 2, "repeats": 3}


def _log(msg: str) -> None:
    print(f"[bench training] {msg}", flush=True)


def sft_rows(tokenizer, task, count: int, offset: int, max_length: int) -> list[dict[str, list[int]]]:
    """``count`` tokenized SFT rows of ``task`` from its raw examples (starting at ``offset``),
    rendered with the task's prompt as the tuning asset renders them."""
    from genops_assets.lib.formatting import build_messages, format_target
    from genops_assets.lib.tasks import read_raw_file
    from genops_assets.lib.training import SftExample, tokenize_example

    raw = [r for f in task.raw_files() for r in read_raw_file(f, task)]
    if len(raw) < offset + count:
        raise ValueError(f"task '{task.name}' has {len(raw)} examples; the benchmark needs {offset + count}")
    rows = []
    for i, r in enumerate(raw[offset:offset + count]):
        ex = SftExample(f"bench_{offset + i}", build_messages(task, r.input_text, contexts=r.contexts),
                        format_target(r.output, task.output_fields))
        row = tokenize_example(tokenizer, ex, max_length)
        if row is None:
            raise ValueError(f"task '{task.name}' example {offset + i} is longer than max_length={max_length}")
        rows.append(row)
    return rows


class _CountingCollator:
    """Wraps a collator and records the non-padding tokens of every batch it builds, in order
    (the dataloader runs in this process, so the n-th batch built is the n-th step's)."""

    def __init__(self, inner: Callable) -> None:
        self.inner = inner
        self.tokens: list[int] = []

    def __call__(self, rows):
        self.tokens.append(sum(len(r["input_ids"]) for r in rows))
        return self.inner(rows)


def validation_loss(model, rows: Sequence[dict[str, list[int]]], pad_token_id: int, batch_size: int = 8) -> float:
    """Mean cross-entropy over the answer tokens of ``rows`` (padded batches, one definition for
    both sides)."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collator(list(rows[start:start + batch_size]))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                                       ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
    return total / count


def run_side(side: str, base_dir: str, tokenizer, train_rows, val_rows, steps: int, warmup: int, batch_size: int,
             seed: int, work: Path) -> dict:
    """Train ``warmup + steps`` optimizer steps on one side; time the last ``steps``."""
    import torch
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    from genops_assets.lib.packing import sft_batching
    from genops_assets.lib.training import LoraTrainConfig, to_lora_config

    cfg = LoraTrainConfig(batch_size=batch_size, seed=seed)
    if side == "genops":
        collator, sampling = sft_batching(True, tokenizer.pad_token_id)
    elif side == "naive":
        collator, sampling = DataCollatorForSeq2Seq(tokenizer, padding="longest"), "random"
    else:
        raise ValueError(f"unknown side {side!r} (genops, naive)")
    counting = _CountingCollator(collator)
    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True)
    model = get_peft_model(model, to_lora_config(cfg))
    marks: dict[int, tuple[float, float]] = {}

    class _Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks[state.global_step] = (time.perf_counter(), time.process_time())

    args = TrainingArguments(
        output_dir=str(work / side), per_device_train_batch_size=batch_size, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, lr_scheduler_type="cosine",
        max_steps=warmup + steps, logging_steps=cfg.log_every, save_strategy="no", eval_strategy="no",
        seed=seed, data_seed=seed, use_cpu=not torch.cuda.is_available(), report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, train_sampling_strategy=sampling)
    trainer = Trainer(model=model, args=args, train_dataset=train_rows, data_collator=counting, callbacks=[_Clock()])
    trainer.train()
    total = warmup + steps
    (wall0, cpu0), (wall1, cpu1) = marks[warmup], marks[total]
    tokens = sum(counting.tokens[warmup:total])
    loss = validation_loss(model, val_rows, tokenizer.pad_token_id)
    return {"tokens": tokens, "wall_s": wall1 - wall0, "cpu_s": cpu1 - cpu0,
            "tokens_per_s": tokens / (wall1 - wall0), "tokens_per_cpu_s": tokens / (cpu1 - cpu0),
            "validation_loss": loss}


def bench_training(base_dir: str, task, *, train: int, validation: int, steps: int, warmup: int, repeats: int,
                   batch_size: int = 4, seed: int = 0, max_length: int = 384, work: Path,
                   log: Callable[[str], None] = _log) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if train < (warmup + steps) * batch_size:
        log(f"{train} train rows cover {train // batch_size} steps of {batch_size}; the Trainer starts a new epoch")
    train_rows = sft_rows(tokenizer, task, train, 0, max_length)
    val_rows = sft_rows(tokenizer, task, validation, train, max_length)
    runs: dict[str, list[dict]] = {"naive": [], "genops": []}
    for rep in range(repeats):
        for side in (("naive", "genops") if rep % 2 == 0 else ("genops", "naive")):
            r = run_side(side, base_dir, tokenizer, train_rows, val_rows, steps, warmup, batch_size, seed, work)
            runs[side].append(r)
            log(f"repeat {rep + 1}/{repeats} {side}: {r['tokens']} tokens in {r['wall_s']:.1f}s "
                f"({r['tokens_per_s']:.0f} tokens/s, {r['tokens_per_cpu_s']:.0f} per CPU-s), "
                f"validation loss {r['validation_loss']:.4f}")

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[side])

    ratio = med("genops", "tokens_per_s") / med("naive", "tokens_per_s")
    cpu_ratio = med("genops", "tokens_per_cpu_s") / med("naive", "tokens_per_cpu_s")
    naive_loss = med("naive", "validation_loss")
    loss_diff = abs(med("genops", "validation_loss") - naive_loss) / naive_loss
    return {
        "model": Path(base_dir).name, "task": task.name, "train_rows": train, "validation_rows": validation,
        "batch_size": batch_size, "timed_steps": steps, "warmup_steps": warmup, "repeats": repeats, "seed": seed,
        "naive": {"tokens_per_s": round(med("naive", "tokens_per_s"), 1),
                  "tokens_per_cpu_s": round(med("naive", "tokens_per_cpu_s"), 1),
                  "validation_loss": round(med("naive", "validation_loss"), 5)},
        "genops": {"tokens_per_s": round(med("genops", "tokens_per_s"), 1),
                   "tokens_per_cpu_s": round(med("genops", "tokens_per_cpu_s"), 1),
                   "validation_loss": round(med("genops", "validation_loss"), 5)},
        "speedup": round(ratio, 2), "speedup_cpu_time": round(cpu_ratio, 2),
        "validation_loss_rel_diff": round(loss_diff, 5),
        "target": f">= {TARGET_RATIO}x at validation loss within {LOSS_TOLERANCE:.0%}",
        "met": ratio >= TARGET_RATIO and loss_diff <= LOSS_TOLERANCE,
        "runs": {side: [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rs]
                 for side, rs in runs.items()},
    }


def summary(r: dict) -> str:
    return (f"  training ({r['model']}, {r['task']}, batch {r['batch_size']}, {r['timed_steps']} timed steps x "
            f"{r['repeats']}): naive {r['naive']['tokens_per_s']:.0f} tokens/s, "
            f"genops {r['genops']['tokens_per_s']:.0f} tokens/s: {r['speedup']}x "
            f"({r['speedup_cpu_time']}x per CPU-second); validation loss "
            f"{r['naive']['validation_loss']:.4f} vs {r['genops']['validation_loss']:.4f} "
            f"({r['validation_loss_rel_diff']:.2%} apart); target {r['target']}: {'met' if r['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m genops_assets.bench.training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"reduced settings {QUICK}")
    for key, value in FULL.items():
        p.add_argument(f"--{key}", type=int, default=None, help=f"default {value} ({QUICK[key]} with --quick)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--task", default=os.environ.get("GENOPS_TASK", "support_triage"))
    p.add_argument("--base", default=None, help="base model folder (default: the embedded model, converted)")
    args = p.parse_args(argv)
    import json
    import tempfile

    from genops_assets.lib.tasks import load_task
    from resources import genops_home

    settings = {k: getattr(args, k) if getattr(args, k) is not None else (QUICK if args.quick else FULL)[k]
                for k in FULL}
    if args.base:
        base_dir = args.base
    else:
        from genops_assets.lib.base_model import convert_gguf, find_embedded_gguf

        base_dir = convert_gguf(find_embedded_gguf(), genops_home() / "models" / "base", log=_log).path
    with tempfile.TemporaryDirectory(prefix="genops-bench-training-") as tmp:
        result = bench_training(str(base_dir), load_task(REPO / "tasks", args.task), batch_size=args.batch_size,
                                work=Path(tmp), **settings)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    print(summary(result))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
