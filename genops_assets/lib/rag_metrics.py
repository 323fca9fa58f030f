"""Retrieval metrics for tasks whose examples carry retrieved contexts (ragas, no LLM).

Context precision (are the retrieved passages relevant, relevant ones ranked first) and
context recall (were the reference passages retrieved), with ragas' non-LLM string
similarity deciding whether two passages match. Faithfulness and answer relevancy go
through the judge with the ``groundedness`` and ``helpfulness`` rubrics.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence


def context_metrics(retrieved: Sequence[str], reference: Sequence[str]) -> dict[str, float]:
    """ragas NonLLMContextPrecisionWithReference and NonLLMContextRecall of one example."""
    if not retrieved or not reference:
        raise ValueError("context metrics need at least one retrieved and one reference context")
    os.environ.setdefault("RAGAS_DO_NOT_TRACK", "true")
    from ragas.dataset_schema import SingleTurnSample
    from ragas.metrics import NonLLMContextPrecisionWithReference, NonLLMContextRecall

    sample = SingleTurnSample(retrieved_contexts=list(retrieved), reference_contexts=list(reference))
    precision, recall = NonLLMContextPrecisionWithReference(), NonLLMContextRecall()

    async def score() -> tuple[float, float]:
        return await precision.single_turn_ascore(sample), await recall.single_turn_ascore(sample)

    p, r = asyncio.run(score())
    return {"context_precision": float(p), "context_recall": float(r)}
