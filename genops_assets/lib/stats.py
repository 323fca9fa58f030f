"""Statistics for evaluation and monitoring: percentiles, bootstrap intervals, win/tie/loss
rates, agreement (scikit-learn's Cohen's kappa, balanced accuracy, confusion matrix), pass@k,
and prediction-powered inference of a mean.

Every function is deterministic for a given seed.

* Percentiles, wherever genops reports one (offline latency, online monitoring, benchmarks),
  use numpy's ``method="linear"`` (Hyndman & Fan type 7, numpy's default), so their p95s compare.
* Intervals are percentile bootstraps written on numpy rather than ``scipy.stats.bootstrap``:
  the means of all resamples come from one vectorised index draw (the paired and unpaired cases
  of the promotion and online-quality gates run thousands of times per report), and the
  intervals, which gates read, stay the ones earlier reports and thresholds were set against.
  scipy's BCa would also need a jackknife per call and gives no interval on the constant
  samples (all 0 or all 1) that small golden sets often yield.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

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


PERCENTILE_METHOD = "linear"


def finite_values(values: Any) -> np.ndarray:
    """The numbers among ``values`` as floats; None, NaN and non-numbers are left out."""
    import pandas as pd

    arr = pd.to_numeric(pd.Series(values, dtype="object"), errors="coerce").to_numpy(dtype=float)
    return arr[~np.isnan(arr)]


def percentile(values: Any, q: float) -> float | None:
    """The ``q``-th percentile (0-100) of the non-null values by numpy's 'linear' method: for n
    sorted values x[0..n-1] it sits at h = (n - 1) * q / 100, between x[floor(h)] and the next.
    None when there is no value."""
    arr = finite_values(values)
    if arr.size == 0:
        return None
    return float(np.percentile(arr, q, method=PERCENTILE_METHOD))


def _resampled(data: np.ndarray, rng: np.random.Generator, n_resamples: int,
               stat: Callable[[np.ndarray], float] = np.mean) -> np.ndarray:
    idx = rng.integers(0, data.size, size=(n_resamples, data.size))
    return data[idx].mean(axis=1) if stat is np.mean else np.array([stat(data[row]) for row in idx])


def _interval(estimate: float, resampled: np.ndarray, level: float) -> Interval:
    alpha = (1.0 - level) / 2.0
    return Interval(float(estimate), float(np.quantile(resampled, alpha)), float(np.quantile(resampled, 1 - alpha)),
                    level)


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
    return _interval(stat(data), _resampled(data, np.random.default_rng(seed), n_resamples, stat), level)


def paired_difference_ci(
    candidate: Sequence[float], baseline: Sequence[float], n_resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Bootstrap interval of mean(candidate - baseline) over paired per-example scores."""
    a, b = np.asarray(candidate, dtype=float), np.asarray(baseline, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores differ in length: {a.shape} vs {b.shape}")
    return bootstrap_ci(a - b, n_resamples=n_resamples, level=level, seed=seed)


def unpaired_difference_ci(a: Sequence[float], b: Sequence[float], n_resamples: int = 2000, level: float = 0.95,
                           seed: int = 0) -> Interval:
    """Percentile bootstrap interval of mean(a) - mean(b) for two independent samples: each
    resample draws a with replacement from a and b from b."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size == 0 or y.size == 0:
        raise ValueError(f"difference of means needs two non-empty samples (sizes {x.size}, {y.size})")
    rng = np.random.default_rng(seed)
    diffs = _resampled(x, rng, n_resamples) - _resampled(y, rng, n_resamples)
    return _interval(x.mean() - y.mean(), diffs, level)


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


def wilson_interval(successes: int, n: int, level: float = 0.95) -> Interval:
    """Wilson score interval of a proportion (``successes`` of ``n``). Unlike a bootstrap it
    stays informative at 0 or ``n`` successes, which small held-out sets often give."""
    from statistics import NormalDist

    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"a proportion needs 0 <= successes <= n and n > 0 (successes={successes}, n={n})")
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n successes the bound is exactly 0 or 1; the formula leaves a rounding residue.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(p, low, high, level)


def mcnemar_exact(worse: int, better: int) -> float:
    """One-sided exact McNemar test on paired binary outcomes: the probability of at least
    ``worse`` of the ``worse + better`` discordant pairs going the bad way if either way were
    equally likely (a binomial test at 1/2). 1.0 when there is no discordant pair."""
    from scipy.stats import binomtest

    if worse < 0 or better < 0:
        raise ValueError(f"discordant counts must be >= 0 (worse={worse}, better={better})")
    n = worse + better
    return 1.0 if n == 0 else float(binomtest(worse, n, 0.5, alternative="greater").pvalue)


def _two_raters(a: Sequence[str], b: Sequence[str], what: str) -> None:
    if len(a) != len(b) or not a:
        raise ValueError(f"{what} needs two equally long, non-empty label lists (lengths {len(a)}, {len(b)})")


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's kappa between two raters' labels of the same items (scikit-learn's), or None
    when it is not defined: both raters gave every item one and the same label, so chance
    agreement is 1 and kappa is 0/0. None is "not computed", never a pass."""
    _two_raters(a, b, "kappa")
    if len(set(a) | set(b)) == 1:
        return None
    from sklearn.metrics import cohen_kappa_score

    return float(cohen_kappa_score(list(a), list(b)))


def accuracy(a: Sequence[str], b: Sequence[str]) -> float:
    _two_raters(a, b, "accuracy")
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(list(a), list(b)))


def balanced_accuracy(truth: Sequence[str], predicted: Sequence[str]) -> float:
    """Mean recall over the classes that occur in ``truth`` (scikit-learn's): a judge cannot
    score well by always naming the most common class."""
    _two_raters(truth, predicted, "balanced accuracy")
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():  # predicted classes absent from truth: recall over truth's classes
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(list(truth), list(predicted)))


def confusion(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> list[list[int]]:
    """Counts ``[i][j]`` of items whose true label is ``labels[i]`` and predicted ``labels[j]``
    (scikit-learn's confusion matrix); a label outside ``labels`` is an error."""
    _two_raters(truth, predicted, "confusion matrix")
    unknown = sorted((set(truth) | set(predicted)) - set(labels))
    if unknown:
        raise ValueError(f"labels {unknown} are not among {list(labels)}")
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(list(truth), list(predicted), labels=list(labels)).tolist()


def normal_quantile(level: float) -> float:
    """z of a two-sided ``level`` interval (1.96 for 0.95)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be within (0, 1), got {level}")
    from scipy.stats import norm

    return float(norm.ppf(0.5 + level / 2.0))


def ppi_mean(judge_unlabelled: Sequence[float], judge_labelled: Sequence[float], human_labelled: Sequence[float],
             level: float = 0.95) -> Interval:
    """Prediction-powered estimate of a mean (Angelopoulos et al., 2023): a judge labelled N
    items nobody rated and n items people rated too. The judge's mean on the N items, corrected
    by the mean of (human - judge) on the n items (the rectifier: the judge's bias, measured where
    people answered), is unbiased whatever the judge's quality; its variance is
    var(judge on N)/N + var(human - judge on n)/n, so the normal interval is valid and narrower
    than the human-only one when the judge tracks people. The n labelled items must be a random
    sample of the same population as the N (not chosen by the judge's verdict)."""
    f = np.asarray(judge_unlabelled, dtype=float)
    fl, y = np.asarray(judge_labelled, dtype=float), np.asarray(human_labelled, dtype=float)
    if fl.shape != y.shape:
        raise ValueError(f"judge and human labels of the labelled items differ in length: {fl.size} vs {y.size}")
    if f.size < 2 or y.size < 2:
        raise ValueError(f"prediction-powered inference needs at least 2 unlabelled and 2 labelled items "
                         f"(got {f.size} and {y.size})")
    rectifier = y - fl
    estimate = float(f.mean() + rectifier.mean())
    se = math.sqrt(f.var(ddof=1) / f.size + rectifier.var(ddof=1) / y.size)
    z = normal_quantile(level)
    return Interval(estimate, estimate - z * se, estimate + z * se, level)


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
