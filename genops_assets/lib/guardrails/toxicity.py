"""Toxicity of output text with alt-profanity-check (a linear model over character n-grams
shipped inside its wheel: nothing to download). Imported on first use: loading it takes about
a second."""

from __future__ import annotations

import functools
import threading

_lock = threading.Lock()


@functools.cache
def _predict_prob():
    from profanity_check import predict_prob

    return predict_prob


def toxicity_score(text: str) -> float:
    """Probability (0..1) that ``text`` is profane or abusive."""
    if not text.strip():
        return 0.0
    predict = _predict_prob()
    with _lock:  # scikit-learn's transform is not documented as thread-safe
        return float(predict([text])[0])


def warm_up() -> None:
    """Load the model now rather than on the first answer."""
    toxicity_score("warm up")
