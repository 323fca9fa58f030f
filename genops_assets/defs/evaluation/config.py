from __future__ import annotations

from typing import Literal

import dagster as dg
from pydantic import Field


class EvalConfig(dg.Config):
    max_examples: int | None = Field(None, description="Evaluate only the first N golden examples (quick runs).")
    batch_size: int = Field(8, description="Prompts generated together (left-padded batches).")
    base_few_shot: int = Field(2, description="Worked examples from few_shot_examples given to the base model "
                                             "(what prompting alone achieves), beside its 0-shot answers; 0: "
                                             "0-shot only.")
    few_shot_strategy: str = Field("nearest", description="How shots are picked: fixed, stratified or nearest "
                                   "(embedding neighbours of each input, all-MiniLM-L6-v2).")
    samples: int = Field(1, description="Answers sampled per golden example for the candidate (> 1 adds "
                                       "pass@k / pass^k with intervals).")
    sample_temperature: float = Field(0.7, description="Temperature of those samples.")
    margin: float = Field(0.02, description="How much the candidate must beat the champion (or the base model "
                                           "when there is no champion) by on the task's primary metric.")
    judge_rag: bool = Field(True, description="Tasks with retrieved contexts: judge faithfulness and answer "
                                              "relevancy of every evaluated model (two judge calls per golden "
                                              "example and model, cached); False: retrieval metrics only.")
    seed: int = Field(0, description="Seed of the bootstrap intervals of the RAG metrics.")
    quantization: Literal["none", "nf4", "int8"] = Field(
        "none", description="Load the base model in 4-bit NF4 or 8-bit through bitsandbytes (answers are cached "
                            "apart from the full-precision ones); fails before any work where this machine cannot.")


class SxsConfig(dg.Config):
    baseline: str = Field("base", description="What the candidate is compared with: 'base' (the base model's "
                                              "answers in eval_report) or 'champion' (when one was evaluated).")
    pairwise_rubric: str = Field("pairwise_quality", description="Pairwise rubric name (built-in or the task's).")
    pointwise_rubrics: list[str] = Field([], description="Built-in pointwise rubrics scored for both models "
                                         "(e.g. instruction_following, helpfulness); the task's own rubrics "
                                         "are always added.")
    max_examples: int | None = Field(48, description="Judge the first N golden examples (None: all). The "
                                     "intervals in the report show what the sample size allows.")
    seed: int = Field(0, description="Seed of the bootstrap intervals.")


class JudgeCertificateConfig(dg.Config):
    rubric: str = Field("pairwise_quality", description="Pairwise rubric the judge is certified with (the one "
                                                        "AutoSxS uses; a certificate holds for its judge and rubric).")
    repeats: int = Field(2, ge=1, description="Calls per pair in the first order: the first as is, the others "
                                             "with the prompt's whitespace reformatted (repeat stability).")
    max_probe_examples: int | None = Field(None, ge=1, description="Golden examples the objective probe is built "
                                           "from; None: the task's judge.max_probe_examples.")
    seed: int = Field(0, description="Seed of the probes' corruptions and sides, and of the bootstrap.")
