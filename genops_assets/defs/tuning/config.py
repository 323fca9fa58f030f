"""Typed tuning configuration, converted once into the training library's dataclass."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from genops_assets.lib.training import DEFAULT_TARGET_MODULES, LoraTrainConfig


class TuningConfig(dg.Config):
    rank: int = Field(16, description="LoRA rank r.")
    alpha: int = Field(32, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, description="LoRA dropout.")
    target_modules: list[str] = Field(list(DEFAULT_TARGET_MODULES), description="Module names that get adapters.")
    learning_rate: float = Field(1e-3, description="Peak learning rate (cosine schedule, linear warm-up).")
    max_steps: int = Field(100, description="Optimizer steps; <= 0 means use `epochs`.")
    epochs: float = Field(1.0, description="Epochs over the train split when max_steps <= 0.")
    max_length: int = Field(384, description="Longest prompt+answer in tokens; longer examples are skipped and reported.")
    batch_size: int = Field(4, description="Per-device batch size.")
    grad_accum: int = Field(1, description="Gradient accumulation steps.")
    warmup_steps: int = Field(5, description="Linear warm-up steps.")
    seed: int = Field(0, description="Seed for initialisation, shuffling and dropout.")
    eval_every: int = Field(50, description="Validation loss every N steps (0: only at the end).")
    save_every: int = Field(50, description="Checkpoint every N steps.")
    log_every: int = Field(5, description="Log training loss every N steps.")
    bf16: bool = Field(False, description="bf16 mixed precision (GPU only).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory on big models.")
    deepspeed_config: str | None = Field(None, description="Path to a DeepSpeed JSON config (multi-GPU).")
    max_train_examples: int | None = Field(None, description="Use only the first N train examples (quick runs).")
    resume: bool = Field(
        True,
        description="Continue from the newest complete checkpoint left by an interrupted run with the same version "
                    "key; False deletes those checkpoints and trains from step 0. Not part of the version key.",
    )

    def to_train_config(self) -> LoraTrainConfig:
        return LoraTrainConfig(
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=tuple(self.target_modules),
            learning_rate=self.learning_rate,
            max_steps=self.max_steps,
            epochs=self.epochs,
            max_length=self.max_length,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            warmup_steps=self.warmup_steps,
            seed=self.seed,
            eval_every=self.eval_every,
            save_every=self.save_every,
            log_every=self.log_every,
            bf16=self.bf16,
            gradient_checkpointing=self.gradient_checkpointing,
            deepspeed_config=self.deepspeed_config,
        )
