"""Online quality: live answers judged pointwise and compared with the offline evaluation.

* Sampling is by content, not by chance: a row is kept when the hash of its id falls below
  the share, so a re-run over the same day picks the same rows; past ``max_count`` the rows
  with the smallest hashes are kept (a uniform subset, not the first hours of the day).
* Live and offline answers are scored by the same judge with the same pointwise rubric, shown
  the same way: the task input as ``{input}``, the answer as ``{response}`` and no reference
  (live traffic has none, so the offline side is judged without one too). Only then are the
  two means comparable.
* A judge failure stays a failure of that row (score ``None`` with the error); it is never
  turned into a score.
* Live and offline samples are independent, so the interval of the difference of means
  resamples each side on its own (unpaired bootstrap).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from genops_assets.lib.judging import Failure, Rubric, Verdict, expected_score
from genops_assets.lib.stats import Interval, bootstrap_ci, unpaired_difference_ci

NO_REFERENCE = "(none)"
SAMPLING_SALT = "genops.online_quality"

T = TypeVar("T")


# -- sampling -----------------------------------------------------------------------------

def sample_hash(key: str, salt: str = SAMPLING_SALT) -> float:
    """A stable number in [0, 1) for ``key``: the first 8 bytes of sha256(salt:key)."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def sample_rows(rows: Sequence[T], key: Callable[[T], str], share: float, max_count: int | None = None,
                salt: str = SAMPLING_SALT) -> list[T]:
    """The rows whose key hashes below ``share``, at most ``max_count`` of them (those with the
    smallest hashes), in their original order. Deterministic: the same rows give the same sample."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"sampling share must be within [0, 1], got {share}")
    if max_count is not None and max_count < 0:
        raise ValueError(f"max_count must be >= 0, got {max_count}")
    hashed = [(sample_hash(str(key(r)), salt), i) for i, r in enumerate(rows)]
    kept = sorted((h, i) for h, i in hashed if h < share)
    if max_count is not None:
        kept = kept[:max_count]
    return [rows[i] for i in sorted(i for _, i in kept)]


# -- judging ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScoreItem:
    """One answer to judge: ``item_id`` is a request id (live) or an example id (offline)."""

    item_id: str
    input: str
    response: str


@dataclass(frozen=True)
class ScoredItem:
    item_id: str
    score: float | None
    choice: str | None
    error: str | None
    cached: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PointwiseJudge(Protocol):
    def choose_many(self, items: Sequence[tuple[Sequence[Mapping[str, str]], Sequence[str], str]],
                    on_done: Callable[[int, int], None] | None = None) -> list[Verdict | Failure]: ...


def score_pointwise(judge: PointwiseJudge, rubric: Rubric, items: Sequence[ScoreItem],
                    on_done: Callable[[int, int], None] | None = None) -> list[ScoredItem]:
    """Each item's expected score on the rubric's scale, or its judge failure."""
    if rubric.kind != "pointwise":
        raise ValueError(f"rubric '{rubric.name}' ({rubric.source}) is {rubric.kind}, not pointwise")
    calls = [(rubric.render(input=it.input, reference=NO_REFERENCE, response=it.response), rubric.choices,
              rubric.version) for it in items]
    verdicts = judge.choose_many(calls, on_done=on_done) if calls else []
    if len(verdicts) != len(items):
        raise RuntimeError(f"judge returned {len(verdicts)} verdicts for {len(items)} items")
    out = []
    for it, v in zip(items, verdicts, strict=True):
        if isinstance(v, Failure):
            out.append(ScoredItem(it.item_id, None, None, v.error))
        else:
            out.append(ScoredItem(it.item_id, expected_score(v), v.choice, None, v.cached))
    return out


def scores_of(scored: Sequence[ScoredItem]) -> list[float]:
    """The scores of the rows the judge answered (failures left out, never filled in)."""
    return [s.score for s in scored if s.score is not None]


# -- offline predictions ------------------------------------------------------------------

def load_offline_predictions(path: str | Path, labels: Mapping[str, str]) -> dict[str, list[ScoreItem]]:
    """Golden-set answers from an evaluation's ``predictions.jsonl``, by adapter version.

    ``labels`` maps a model label of that file (``"candidate v3"``) to the adapter version it
    evaluated (``"3"``); rows of other models (the base model, prompt variants) are skipped.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"offline predictions file {p} does not exist")
    out: dict[str, list[ScoreItem]] = {}
    with open(p, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                label = row["model"]
                if label not in labels:
                    continue
                item = ScoreItem(str(row["example_id"]), str(row["input"]), str(row["prediction"]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{p}, line {n}: expected a JSON object with model, example_id, input and "
                                 f"prediction: {exc}") from exc
            out.setdefault(labels[label], []).append(item)
    return out


# -- comparison ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    """Live against offline scores of one adapter version (live minus offline)."""

    live_n: int
    offline_n: int
    live: Interval | None
    offline: Interval | None
    delta: Interval | None
    margin: float
    decided: bool
    regression: bool
    improvement: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("live", "offline", "delta"):
            iv = getattr(self, k)
            d[k] = None if iv is None else iv.as_dict()
        return d


def compare(live: Sequence[float], offline: Sequence[float], margin: float = 0.0, min_samples: int = 10,
            n_resamples: int = 2000, seed: int = 0) -> Comparison:
    """Means, difference and its 95% interval; a regression when the whole interval lies below
    ``-margin`` (live clearly worse), an improvement when it lies above ``+margin``. With fewer
    than ``min_samples`` scores on either side nothing is decided."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    ln, on = len(live), len(offline)
    live_iv = bootstrap_ci(live, n_resamples=n_resamples, seed=seed) if ln else None
    off_iv = bootstrap_ci(offline, n_resamples=n_resamples, seed=seed) if on else None
    delta = unpaired_difference_ci(live, offline, n_resamples=n_resamples, seed=seed) if ln and on else None
    if ln < max(min_samples, 1) or on < max(min_samples, 1):
        return Comparison(ln, on, live_iv, off_iv, delta, margin, False, False, False,
                          f"too few scores to decide: live {ln}, offline {on}, need {max(min_samples, 1)} each")
    assert delta is not None
    regression = delta.high < -margin
    improvement = delta.low > margin
    if regression:
        reason = f"live is worse: difference {delta} lies below -{margin:g}"
    elif improvement:
        reason = f"live is better: difference {delta} lies above +{margin:g}"
    else:
        reason = f"no significant difference: {delta} reaches within ±{margin:g} of 0"
    return Comparison(ln, on, live_iv, off_iv, delta, margin, True, regression, improvement, reason)


def comparison_chart_png(comparisons: Mapping[str, Comparison], rubric: str, top: float) -> bytes:
    """Live and offline mean score per adapter version, each with its 95% interval."""
    from genops_assets.lib.report import _plt, _png

    plt = _plt()
    versions = list(comparisons)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.8 * len(versions) + 1.5), 3.4), dpi=110)
    width = 0.38
    for side, offset, color in (("offline", -width / 2, "#616161"), ("live", width / 2, "#1565c0")):
        for i, v in enumerate(versions):
            iv = getattr(comparisons[v], side)
            if iv is None:
                continue
            ax.bar(i + offset, iv.estimate, width, color=color, label=side if i == 0 else None,
                   yerr=[[iv.estimate - iv.low], [iv.high - iv.estimate]], capsize=5)
            ax.text(i + offset, iv.high + 0.05, f"{iv.estimate:.2f}", ha="center", fontsize=8)
    labels = []
    for v in versions:
        c = comparisons[v]
        flag = " REGRESSION" if c.regression else (" improved" if c.improvement else "")
        delta = f"\nΔ {c.delta.estimate:+.2f} [{c.delta.low:+.2f}, {c.delta.high:+.2f}]" if c.delta else ""
        labels.append(f"v{v} (n {c.live_n}/{c.offline_n}){flag}{delta}")
    ax.set_xticks(range(len(versions)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylim(0, top + 0.6)
    ax.set_ylabel(f"{rubric} score", fontsize=8)
    ax.set_title(f"live vs offline, {rubric} (95% CI)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)
