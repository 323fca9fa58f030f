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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from genops_assets.lib.jsonl import iter_jsonl
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
    for line_no, row in iter_jsonl(p):
        try:
            label = row["model"]
            if label not in labels:
                continue
            item = ScoreItem(str(row["example_id"]), str(row["input"]), str(row["prediction"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{p}, line {line_no}: expected a JSON object with model, example_id, input and "
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
    need = max(min_samples, 1)
    if delta is None or ln < need or on < need:
        return Comparison(ln, on, live_iv, off_iv, delta, margin, False, False, False,
                          f"too few scores to decide: live {ln}, offline {on}, need {need} each")
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


# -- one day, every version ------------------------------------------------------------------

ROW_COLUMNS = (
    ("partition_key", "varchar"), ("side", "varchar"), ("version", "varchar"), ("item_id", "varchar"),
    ("ts", "timestamp"), ("served_by", "varchar"), ("prompt_version", "varchar"), ("rubric", "varchar"),
    ("rubric_version", "varchar"), ("judge_model", "varchar"), ("score", "double"), ("choice", "varchar"),
    ("error", "varchar"), ("cached", "boolean"), ("judged_at", "timestamp"), ("judge_certified", "boolean"),
)
SUMMARY_COLUMNS = (
    ("partition_key", "varchar"), ("version", "varchar"), ("rubric", "varchar"), ("rubric_version", "varchar"),
    ("live_n", "integer"), ("live_failures", "integer"), ("live_mean", "double"), ("live_low", "double"),
    ("live_high", "double"), ("offline_n", "integer"), ("offline_failures", "integer"), ("offline_mean", "double"),
    ("offline_low", "double"), ("offline_high", "double"), ("delta", "double"), ("ci_low", "double"),
    ("ci_high", "double"), ("margin", "double"), ("decided", "boolean"), ("regression", "boolean"),
    ("improvement", "boolean"), ("reason", "varchar"), ("judged_at", "timestamp"), ("judge_certified", "boolean"),
)


@dataclass(frozen=True)
class LiveAnswer:
    """One successful answer of the endpoint, as the request log recorded it."""

    request_id: str
    ts: Any
    version: str | None  # adapter version that answered; None for the base model
    prompt_version: str | None
    served_by: str | None
    input_text: str
    response_text: str


@dataclass(frozen=True)
class QualityPlan:
    """How much is judged and how the two sides are compared."""

    share: float
    max_samples: int
    offline_max_examples: int | None
    margin: float
    min_samples: int
    seed: int


@dataclass(frozen=True)
class VersionQuality:
    """One adapter version's day: its sampled live answers and golden answers, judged, compared."""

    version: str
    live: list[tuple[LiveAnswer, ScoredItem]]
    offline: list[ScoredItem]
    comparison: Comparison

    @property
    def live_failures(self) -> int:
        return sum(s.error is not None for _, s in self.live)

    @property
    def offline_failures(self) -> int:
        return sum(s.error is not None for s in self.offline)

    def failures(self) -> dict[str, Any]:
        errors = [s.error for _, s in self.live] + [s.error for s in self.offline]
        return {"live": self.live_failures, "offline": self.offline_failures,
                "first_errors": [e for e in errors if e][:5]}

    def as_dict(self) -> dict[str, Any]:
        return {**self.comparison.as_dict(), "failures": self.failures()}


def judge_version(judge: PointwiseJudge, rubric: Rubric, version: str, live: Sequence[LiveAnswer],
                  offline: Sequence[ScoreItem], plan: QualityPlan,
                  on_done: Callable[[int, int], None] | None = None) -> VersionQuality:
    """Sample the version's live answers (by hash of the request id) and its golden answers,
    judge both with ``rubric`` and compare the two means."""
    sampled = sample_rows(list(live), lambda answer: answer.request_id, plan.share, plan.max_samples)
    golden = sample_rows(list(offline), lambda item: item.item_id, 1.0, plan.offline_max_examples)
    live_scored = score_pointwise(judge, rubric, [ScoreItem(a.request_id, a.input_text, a.response_text)
                                                  for a in sampled], on_done=on_done)
    offline_scored = score_pointwise(judge, rubric, golden, on_done=on_done)
    comparison = compare(scores_of(live_scored), scores_of(offline_scored), plan.margin, plan.min_samples,
                         seed=plan.seed)
    return VersionQuality(version, list(zip(sampled, live_scored, strict=True)), offline_scored, comparison)


def headline_version(results: Mapping[str, VersionQuality]) -> str:
    """The comparison a rollback acts on: the worst regressed version (highest upper bound of
    the difference) if any regressed, else the version with the most live answers judged."""
    regressed = [v for v, r in results.items() if r.comparison.regression]
    if regressed:
        return min(regressed, key=lambda v: results[v].comparison.delta.high)
    return max(results, key=lambda v: (results[v].comparison.live_n, v))


def _bounds(interval: Interval | None) -> tuple[float | None, float | None, float | None]:
    return (None, None, None) if interval is None else (interval.estimate, interval.low, interval.high)


def result_rows(partition: str, result: VersionQuality, rubric: Rubric, judge_model: str,
                judged_at: Any, judge_certified: bool) -> list[tuple]:
    """The version's judged answers as ROW_COLUMNS rows (live first, then offline), each marked
    with whether its judge was certified."""
    judged_by = (rubric.name, rubric.version, judge_model)
    rows = [(partition, "live", result.version, s.item_id, answer.ts, answer.served_by, answer.prompt_version,
             *judged_by, s.score, s.choice, s.error, s.cached, judged_at, judge_certified)
            for answer, s in result.live]
    rows += [(partition, "offline", result.version, s.item_id, None, None, None, *judged_by, s.score, s.choice,
              s.error, s.cached, judged_at, judge_certified) for s in result.offline]
    return rows


def summary_row(partition: str, result: VersionQuality, rubric: Rubric, judged_at: Any,
                judge_certified: bool) -> tuple:
    """The version's comparison as a SUMMARY_COLUMNS row."""
    c = result.comparison
    return (partition, result.version, rubric.name, rubric.version, c.live_n, result.live_failures,
            *_bounds(c.live), c.offline_n, result.offline_failures, *_bounds(c.offline), *_bounds(c.delta),
            c.margin, c.decided, c.regression, c.improvement, c.reason, judged_at, judge_certified)


def quality_metrics(results: Mapping[str, VersionQuality]) -> dict[str, float]:
    """Per version: sample sizes, decisions, and each side's mean and the difference with bounds."""
    out: dict[str, float] = {}
    for v, result in results.items():
        c = result.comparison
        out.update({f"v{v}.live_n": c.live_n, f"v{v}.offline_n": c.offline_n,
                    f"v{v}.regression": float(c.regression), f"v{v}.improvement": float(c.improvement)})
        for side in ("live", "offline", "delta"):
            interval = getattr(c, side)
            if interval is not None:
                out.update({f"v{v}.{side}_mean" if side != "delta" else f"v{v}.delta": interval.estimate,
                            f"v{v}.{side}_low": interval.low, f"v{v}.{side}_high": interval.high})
    return out


def pointwise_rubric(name: str, task_rubrics: Path) -> Rubric:
    """The built-in or task rubric ``name``, which must be pointwise."""
    from genops_assets.lib.judging import BUILTIN_RUBRICS, load_rubrics

    rubrics = load_rubrics(BUILTIN_RUBRICS, task_rubrics)
    if name not in rubrics:
        raise ValueError(f"unknown rubric '{name}'; available: {sorted(rubrics)} "
                         f"(built-in {BUILTIN_RUBRICS}, task {task_rubrics})")
    rubric = rubrics[name]
    if rubric.kind != "pointwise":
        raise ValueError(f"rubric '{rubric.name}' ({rubric.source}) is {rubric.kind}; online quality needs a "
                         "pointwise rubric")
    return rubric


def headline_metadata(result: VersionQuality) -> dict[str, Any]:
    """The numbers of the comparison a rollback acts on (means and difference None when a side
    has no judged answer)."""
    c = result.comparison

    def number(interval: Interval | None, attr: str = "estimate") -> float | None:
        return None if interval is None else float(getattr(interval, attr))

    return {"regression": bool(c.regression), "improvement": bool(c.improvement), "decided": bool(c.decided),
            "reason": c.reason, "live_n": c.live_n, "live_mean": number(c.live), "offline_n": c.offline_n,
            "offline_mean": number(c.offline), "delta": number(c.delta), "ci_low": number(c.delta, "low"),
            "ci_high": number(c.delta, "high"), "live_failures": result.live_failures,
            "offline_failures": result.offline_failures}


def write_day_files(folder: Path, chart: bytes, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Path:
    """The day's chart, summary and judged rows, replacing ``folder`` in one rename."""
    import json

    from genops_assets.lib.hashing import atomic_dir

    with atomic_dir(folder) as tmp:
        (tmp / "online_quality.png").write_bytes(chart)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        (tmp / "rows.jsonl").write_text("".join(json.dumps(dict(row), default=str) + "\n" for row in rows))
    return folder
