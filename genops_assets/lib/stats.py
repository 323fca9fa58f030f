"""Statistics for evaluation: bootstrap intervals, win/tie/loss rates, agreement, pass@k.

Pure Python + numpy; every function is deterministic for a given seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

WIN, TIE, LOSS = "win", "tie", "loss"


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    level: float = 0.95

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    stat: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``stat`` over ``values`` (rows resampled with replacement)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("bootstrap of an empty sample")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, data.size, size=(n_resamples, data.size))
    stats = np.array([stat(data[row]) for row in idx]) if stat is not np.mean else data[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return Interval(float(stat(data)), float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha)), level)


def paired_difference_ci(
    candidate: Sequence[float], baseline: Sequence[float], n_resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Bootstrap interval of mean(candidate - baseline) over paired per-example scores."""
    a, b = np.asarray(candidate, dtype=float), np.asarray(baseline, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores differ in length: {a.shape} vs {b.shape}")
    return bootstrap_ci(a - b, n_resamples=n_resamples, level=level, seed=seed)


@dataclass(frozen=True)
class WinRates:
    n: int
    win: Interval
    tie: Interval
    loss: Interval

    def as_dict(self) -> dict:
        return {"n": self.n, "win": self.win.as_dict(), "tie": self.tie.as_dict(), "loss": self.loss.as_dict()}


def win_rates(outcomes: Sequence[str], n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> WinRates:
    """Win / tie / loss shares of the candidate with bootstrap intervals."""
    bad = sorted({o for o in outcomes} - {WIN, TIE, LOSS})
    if bad:
        raise ValueError(f"unknown outcomes {bad}; expected {WIN}/{TIE}/{LOSS}")
    arr = np.asarray(outcomes)
    return WinRates(
        n=len(arr),
        **{k: bootstrap_ci((arr == k).astype(float), n_resamples=n_resamples, level=level, seed=seed)
           for k in (WIN, TIE, LOSS)},
    )


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's kappa between two raters' labels of the same items."""
    if len(a) != len(b) or not a:
        raise ValueError("kappa needs two equally long, non-empty label lists")
    labels = sorted(set(a) | set(b))
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    expected = sum((list(a).count(k) / n) * (list(b).count(k) / n) for k in labels)
    if expected == 1.0:
        return 1.0 if observed == 1.0 else 0.0
    return (observed - expected) / (1.0 - expected)


def accuracy(a: Sequence[str], b: Sequence[str]) -> float:
    if len(a) != len(b) or not a:
        raise ValueError("accuracy needs two equally long, non-empty label lists")
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k: chance that at least one of k samples (of n, c correct) passes."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_hat_k(n: int, c: int, k: int) -> float:
    """pass^k: chance that all of k samples (of n, c correct) pass - consistency, not luck."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass^k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    return math.comb(c, k) / math.comb(n, k)
