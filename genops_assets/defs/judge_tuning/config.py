"""Typed configuration of judge tuning: the LoRA knobs of SFT (``TuningConfig``) with defaults for
pairwise judge prompts, plus what the judge learns from and how it is certified."""

from __future__ import annotations

from pydantic import Field

from genops_assets.defs.tuning.config import TuningConfig


class JudgeTuningConfig(TuningConfig):
    max_length: int = Field(1024, description="Longest judge prompt+answer in tokens (a rubric with two "
                                              "answers is longer than a task prompt); longer pairs are skipped.")
    pairwise_rubric: str = Field("pairwise_quality", description="The pairwise rubric the judge is trained and "
                                 "certified with (built-in or the task's), as AutoSxS asks it.")
    probe_examples: int | None = Field(64, description="SFT train examples the objective probe pairs are built "
                                       "from (up to three pairs each; None: all).")
    probe_reference: bool = Field(False, description="Show the reference answer in the rubric's reference slot "
                                  "of probe pairs (it is then the better answer verbatim); False: '(none)'.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Share of pairs (by hash) kept for the "
                                       "validation loss.")
    certify_repeats: int = Field(2, ge=1, description="Times the certificate asks each question (repeat "
                                 "stability).")
