from __future__ import annotations

import dagster as dg
from pydantic import Field


class EvalConfig(dg.Config):
    max_examples: int | None = Field(None, description="Evaluate only the first N golden examples (quick runs).")
    batch_size: int = Field(8, description="Prompts generated together (left-padded batches).")
    base_few_shot: int = Field(2, description="Worked examples from few_shot_examples given to the base model "
                                             "(what prompting alone achieves); 0 for zero-shot.")
    margin: float = Field(0.02, description="How much the candidate must beat the champion (or the base model "
                                           "when there is no champion) by on the task's primary metric.")
