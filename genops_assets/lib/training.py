"""LoRA supervised fine-tuning with PEFT on the Hugging Face Trainer (accelerate underneath).

Loss is computed on the response tokens only. Every knob lives in ``LoraTrainConfig``;
``to_lora_config`` is the one place that turns it into a PEFT ``LoraConfig``. Progress and
losses go to a callback so the caller (a Dagster asset) decides where they are logged.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from genops_assets.lib.hashing import atomic_dir

TRAINING_CODE_VERSION = "sft-1"
IGNORE_INDEX = -100
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraTrainConfig:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    learning_rate: float = 1e-3
    max_steps: int = 120
    epochs: float = 1.0
    max_length: int = 384
    batch_size: int = 4
    grad_accum: int = 1
    warmup_steps: int = 5
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int = 40
    save_every: int = 40
    log_every: int = 5
    bf16: bool = False
    gradient_checkpointing: bool = False
    deepspeed_config: str | None = None

    def as_params(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = ",".join(self.target_modules)
        return d


@dataclass(frozen=True)
class SftExample:
    example_id: str
    messages: list[dict[str, str]]
    target: str


@dataclass
class TrainResult:
    adapter_dir: str
    steps: int
    train_examples: int
    skipped_too_long: list[str]
    history: list[dict[str, float]] = field(default_factory=list)
    runtime_s: float = 0.0

    def last(self, key: str) -> float | None:
        values = [h[key] for h in self.history if key in h]
        return values[-1] if values else None


ProgressFn = Callable[[dict[str, float]], None]


def to_lora_config(cfg: LoraTrainConfig):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )


def tokenize_example(tokenizer, ex: SftExample, max_length: int) -> dict[str, list[int]] | None:
    """Prompt (chat template + generation prompt) followed by the target and end-of-turn token.

    Prompt tokens get label -100 so the loss covers only the answer. Returns None when the
    whole sequence does not fit in ``max_length`` (cutting would drop the answer or the
    instructions; the caller reports the skipped ids).
    """
    prompt = tokenizer.apply_chat_template(ex.messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(ex.target + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) + len(answer_ids) > max_length:
        return None
    return {
        "input_ids": prompt_ids + answer_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(answer_ids)),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
    }


class _Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: Sequence[dict[str, list[int]]]):
        import torch

        width = max(len(b["input_ids"]) for b in batch)

        def pad(key: str, value: int):
            return torch.tensor([b[key] + [value] * (width - len(b[key])) for b in batch])

        return {
            "input_ids": pad("input_ids", self.pad_id),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", IGNORE_INDEX),
        }


def train_lora(
    base_dir: str | Path,
    train: Sequence[SftExample],
    validation: Sequence[SftExample],
    cfg: LoraTrainConfig,
    adapter_dir: str | Path,
    work_dir: str | Path,
    on_progress: ProgressFn | None = None,
) -> TrainResult:
    """Train a LoRA adapter and write it (safetensors) atomically to ``adapter_dir``.

    Checkpoints go to ``work_dir/checkpoints`` every ``save_every`` steps.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    if not train:
        raise ValueError("no training examples: the sft_dataset train split is empty")
    set_seed(cfg.seed)
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, to_lora_config(cfg))

    skipped: list[str] = []
    train_rows = []
    for ex in train:
        row = tokenize_example(tokenizer, ex, cfg.max_length)
        if row is None:
            skipped.append(ex.example_id)
        else:
            train_rows.append(row)
    val_rows = [r for r in (tokenize_example(tokenizer, ex, cfg.max_length) for ex in validation) if r]
    if not train_rows:
        raise ValueError(f"every training example is longer than max_length={cfg.max_length} tokens")

    steps_per_epoch = math.ceil(len(train_rows) / (cfg.batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.epochs)
    history: list[dict[str, float]] = []

    class _Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs:
                return
            elapsed = time.monotonic() - started
            step = state.global_step
            rec = {"step": float(step), "total_steps": float(total_steps)}
            for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
                if key in logs:
                    rec[key] = float(logs[key])
            if step:
                rec["eta_s"] = elapsed / step * max(total_steps - step, 0)
            history.append(rec)
            if on_progress:
                on_progress(rec)

    has_cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(Path(work_dir) / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size * 2,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type="cosine",
        max_steps=total_steps,
        logging_steps=cfg.log_every,
        eval_strategy="steps" if val_rows and cfg.eval_every > 0 else "no",
        eval_steps=cfg.eval_every if cfg.eval_every > 0 else None,
        save_strategy="steps",
        save_steps=cfg.save_every,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16 and has_cuda,
        use_cpu=not has_cuda,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        deepspeed=cfg.deepspeed_config,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=val_rows or None,
        data_collator=_Collator(tokenizer.pad_token_id),
        callbacks=[_Progress()],
    )
    trainer.train()
    if val_rows:
        final = trainer.evaluate()
        rec = {"step": float(trainer.state.global_step), "total_steps": float(total_steps),
               "eval_loss": float(final["eval_loss"])}
        history.append(rec)
        if on_progress:
            on_progress(rec)
    with atomic_dir(adapter_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return TrainResult(
        adapter_dir=str(adapter_dir),
        steps=trainer.state.global_step,
        train_examples=len(train_rows),
        skipped_too_long=skipped,
        history=history,
        runtime_s=time.monotonic() - started,
    )
