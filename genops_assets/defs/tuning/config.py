"""Typed tuning configuration, converted once into the training library's dataclass.

The defaults are those of ``LoraTrainConfig`` and ``DpoTrainConfig``: stated once, in the library.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import dagster as dg
from pydantic import Field

from genops_assets.lib.preference import DpoTrainConfig
from genops_assets.lib.training import LoraTrainConfig

_LIB = LoraTrainConfig()


class TuningConfig(dg.Config):
    rank: int = Field(_LIB.rank, description="LoRA rank r.")
    alpha: int = Field(_LIB.alpha, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(_LIB.dropout, description="LoRA dropout.")
    target_modules: list[str] = Field(list(_LIB.target_modules), description="Module names that get adapters.")
    learning_rate: float = Field(_LIB.learning_rate,
        description="Peak learning rate (cosine schedule, linear warm-up).")
    max_steps: int = Field(_LIB.max_steps, description="Optimizer steps; <= 0 means use `epochs`.")
    epochs: float = Field(_LIB.epochs, description="Epochs over the train split when max_steps <= 0.")
    max_length: int = Field(_LIB.max_length,
        description="Longest prompt+answer in tokens; longer examples are skipped and reported.")
    batch_size: int = Field(_LIB.batch_size, description="Per-device batch size.")
    grad_accum: int = Field(_LIB.grad_accum, description="Gradient accumulation steps.")
    warmup_steps: int = Field(_LIB.warmup_steps, description="Linear warm-up steps.")
    seed: int = Field(_LIB.seed, description="Seed for initialisation, shuffling and dropout.")
    eval_every: int = Field(_LIB.eval_every, description="Validation loss every N steps (0: only at the end).")
    save_every: int = Field(_LIB.save_every, description="Checkpoint every N steps.")
    log_every: int = Field(_LIB.log_every, description="Log training loss every N steps.")
    bf16: bool = Field(_LIB.bf16, description="bf16 mixed precision (GPU only).")
    gradient_checkpointing: bool = Field(_LIB.gradient_checkpointing,
        description="Trade compute for memory on big models.")
    deepspeed_config: str | None = Field(_LIB.deepspeed_config,
        description="Path to a DeepSpeed JSON config (multi-GPU).")
    quantization: Literal["none", "nf4", "int8"] = Field(_LIB.quantization,
        description="Load the frozen base in 4-bit NF4 (QLoRA) or 8-bit through bitsandbytes; a run that cannot "
                    "quantize on this machine fails before any data work. Part of the version key.")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(_LIB.compute_dtype,
        description="nf4: dtype of the de-quantized matmuls (auto: bfloat16 on a GPU that has it, else float32).")
    double_quant: bool = Field(_LIB.double_quant, description="nf4: quantize the quantization constants too.")
    packing: bool = Field(_LIB.packing,
        description="Padding-free batches: a batch's examples packed into one row that computes their shared prompt "
                    "prefix once, with attention kept inside each example (same loss as padded batches, faster); "
                    "False: padded, length-grouped batches.")
    max_train_examples: int | None = Field(None, description="Use only the first N train examples (quick runs).")
    resume: bool = Field(
        True,
        description="Continue from the newest complete checkpoint left by an interrupted run with the same version "
                    "key; False deletes those checkpoints and trains from step 0. Not part of the version key.",
    )

    def to_train_config(self) -> LoraTrainConfig:
        names = {f.name for f in dataclasses.fields(LoraTrainConfig)} & set(type(self).model_fields)
        values = {name: getattr(self, name) for name in names}
        return LoraTrainConfig(**{**values, "target_modules": tuple(self.target_modules)})


_DPO = DpoTrainConfig()


class PreferenceTuningConfig(dg.Config):
    """DPO of the champion adapter; its LoRA shape (rank, alpha, modules) is the champion's."""

    beta: float = Field(_DPO.beta, gt=0, description="How far the tuned adapter may move from the champion "
                        "(higher: closer to the champion).")
    loss_type: str = Field(_DPO.loss_type, description="TRL DPO loss ('sigmoid' is the DPO paper's).")
    learning_rate: float = Field(_DPO.learning_rate, gt=0, description="Peak learning rate (cosine schedule).")
    max_steps: int = Field(_DPO.max_steps, description="Optimizer steps; <= 0 means use `epochs`.")
    epochs: float = Field(_DPO.epochs, description="Epochs over the train pairs when max_steps <= 0.")
    batch_size: int = Field(_DPO.batch_size, ge=1, description="Pairs per device batch.")
    grad_accum: int = Field(_DPO.grad_accum, ge=1, description="Gradient accumulation steps.")
    warmup_steps: int = Field(_DPO.warmup_steps, ge=0, description="Linear warm-up steps.")
    max_length: int = Field(_DPO.max_length,
        description="Longest prompt+answer in tokens; longer pairs are skipped and reported.")
    seed: int = Field(_DPO.seed, description="Seed for shuffling and initialisation.")
    log_every: int = Field(_DPO.log_every, ge=1, description="Log loss and reward accuracy every N steps.")
    bf16: bool = Field(_DPO.bf16, description="bf16 mixed precision (GPU only).")
    gradient_checkpointing: bool = Field(_DPO.gradient_checkpointing,
        description="Trade compute for memory on big models.")
    max_pairs: int | None = Field(None, ge=1, description="Use only the first N train pairs by pair id (quick runs).")
    min_train_pairs: int = Field(8, ge=1, description="Fewer train pairs than this fail the run: DPO on a "
                                 "handful of ratings learns their noise.")
    score_batch_size: int = Field(4, ge=1, description="Pairs scored at once for the held-out win rate.")

    def to_train_config(self) -> DpoTrainConfig:
        names = {f.name for f in dataclasses.fields(DpoTrainConfig)} & set(type(self).model_fields)
        return DpoTrainConfig(**{name: getattr(self, name) for name in names})
