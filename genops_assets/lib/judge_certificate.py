"""A judge's certificate: what it must show before its verdicts may gate or report anything.

Every pair (a human-labelled comparison or an objective probe) is judged with the pairwise
rubric in both orders, and once more per extra repeat with the prompt's whitespace reformatted.
From those verdicts:

* **position consistency**: the share of pairs whose two verdicts agree once the second is
  un-swapped (A in the swapped order is response 2). An inconsistent pair's combined verdict
  is a tie, as in AutoSxS.
* **repeat stability**: the share of repeated calls whose verdict equals the first call's.
  The judge answers in choice mode at temperature 0 (the argmax of the allowed choices), so
  the very same prompt gives the same verdict by construction, and the call cache would
  answer it anyway. What is measured instead is stability under a change that must not
  matter: the same prompt with its line breaks repeated (repeat k: each line break k+1 times).
  The changed prompt is a different cache key, so every repeat is a real call.
* **agreement with people** on the human-labelled pairs (``both_bad`` counts as ``tie``):
  Cohen's kappa, balanced accuracy and the confusion matrix over {1, 2, tie}, each statistic
  with a bootstrap standard error. A human check passes only when at least
  ``min_human_labels`` labels exist and the lower end of the 95% normal interval
  (estimate - 1.96 SE) clears its threshold: a lucky handful of labels does not certify.
* **length bias**: over the pairs whose better answer is known (a decisive human choice, or a
  probe), the share where the judge picks the longer answer minus the share where the better
  answer is the longer one. Comparing with 50% would punish a right judge on probes, where the
  truncated and broken answers are shorter by construction; comparing with the truth (people,
  or the probe's reference) leaves only the judge's excess taste for length.
* **objective probe**: the golden reference against a corrupted copy (lib/probes.py), shown
  without a reference answer (it would be the right answer itself); accuracy overall and per
  corruption kind. The reference is put on a seeded random side.
* **labels needed**: the number of human labels at which the lower interval bound of kappa and
  of balanced accuracy would clear its threshold if the estimates stay where they are (the
  standard error shrinks as 1/sqrt(n)), at least ``min_human_labels``; None when an estimate
  is at or below its threshold: more labels at this agreement cannot certify the judge.

A judge call that fails leaves its pair out of the statistics it feeds and is counted; a
statistic with nothing to compute from is "not computed" and its check fails.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from genops_assets.lib.judging import PAIRWISE_CHOICES, Failure, Rubric, Verdict
from genops_assets.lib.probes import ProbePair
from genops_assets.lib.stats import balanced_accuracy, cohen_kappa, confusion, normal_quantile
from genops_assets.lib.tasks import JudgeThresholds

HUMAN_CHOICES = ("1", "2", "tie", "both_bad")
LABELS = ("1", "2", "tie")
NO_REFERENCE = "(none)"
LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 1000
HUMAN_COLUMNS = ("item_id", "input_text", "reference_json", "response_1", "response_2", "human_choice")


class PairwiseJudge(Protocol):
    """What the certificate needs of a judge (lib/judging.py ChatJudge has it)."""

    def choose_many(self, items: Sequence[tuple[Sequence[Mapping[str, str]], Sequence[str], str]],
                    on_done: Callable[[int, int], None] | None = None) -> list[Verdict | Failure]: ...


@dataclass(frozen=True)
class HumanChoice:
    """One human-labelled comparison: ``choice`` is ``1``, ``2``, ``tie`` or ``both_bad``
    (response numbers, not screen sides)."""

    item_id: str
    input_text: str
    reference: str
    response_1: str
    response_2: str
    choice: str

    def __post_init__(self) -> None:
        if self.choice not in HUMAN_CHOICES:
            raise ValueError(f"human choice of item {self.item_id} is {self.choice!r}, not one of {HUMAN_CHOICES}")


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def human_choices_from_frame(df, split: str | None = None) -> list[HumanChoice]:
    """HumanChoices from rows of the human_judgements mart (optionally one ``split`` only);
    a missing column or an unknown choice is an error naming it."""
    missing = [c for c in HUMAN_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"human_judgements: missing column(s) {missing} (has {list(df.columns)})")
    if split is not None:
        if "split" not in df.columns:
            raise ValueError(f"human_judgements: no 'split' column to select split '{split}' from")
        df = df[df["split"] == split]
    out = []
    for row in df.itertuples(index=False):
        choice = _text(row.human_choice).strip()
        if choice not in HUMAN_CHOICES:
            raise ValueError(f"human_judgements, item {row.item_id}: human_choice {row.human_choice!r} is not one "
                             f"of {HUMAN_CHOICES}")
        out.append(HumanChoice(str(row.item_id), _text(row.input_text), _text(row.reference_json) or NO_REFERENCE,
                               _text(row.response_1), _text(row.response_2), choice))
    return out


@dataclass(frozen=True)
class Check:
    """``value`` None: not computed (the check fails). ``direction`` says which side passes."""

    value: float | None
    threshold: float
    passed: bool
    direction: str  # ">=" or "<="
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Certificate:
    passed: bool
    checks: dict[str, Check]
    failures: list[str]
    labels_needed: int | None
    labels_needed_reason: str
    statistics: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": {k: c.as_dict() for k, c in self.checks.items()},
                "failures": list(self.failures), "labels_needed": self.labels_needed,
                "labels_needed_reason": self.labels_needed_reason, "statistics": self.statistics}


@dataclass(frozen=True)
class _Pair:
    key: str
    source: str  # "human" | "probe"
    input_text: str
    reference: str
    response_1: str
    response_2: str
    truth: str  # "1" | "2" | "tie": the human choice (both_bad as tie) or the probe's reference side
    kind: str = ""


def _pairs(human: Sequence[HumanChoice], probes: Sequence[ProbePair], seed: int) -> list[_Pair]:
    pairs = [_Pair(f"human:{h.item_id}", "human", h.input_text, h.reference or NO_REFERENCE, h.response_1,
                   h.response_2, "tie" if h.choice == "both_bad" else h.choice) for h in human]
    for p in probes:
        good_first = random.Random(f"{seed}:{p.probe_id}").random() < 0.5
        r1, r2 = (p.good, p.bad) if good_first else (p.bad, p.good)
        pairs.append(_Pair(f"probe:{p.probe_id}", "probe", p.input_text, NO_REFERENCE, r1, r2,
                           "1" if good_first else "2", p.kind))
    keys = [p.key for p in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("human items and probes must have distinct ids")
    return pairs


def perturb(messages: Sequence[Mapping[str, str]], k: int) -> list[dict[str, str]]:
    """The same prompt with each line break of every message repeated ``k + 1`` times."""
    return [{**m, "content": m["content"].replace("\n", "\n" * (k + 1))} for m in messages]


# A's response number in each order: order 1 shows response 1 as A, order 2 shows response 2 as A.
_UNSWAP = ({"A": "1", "B": "2", "C": "tie"}, {"A": "2", "B": "1", "C": "tie"})


def _share(flags: Sequence[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


def _bootstrap_se(stat: Callable[[list[str], list[str]], float | None], truth: list[str], predicted: list[str],
                  seed: int) -> float | None:
    """Standard deviation of ``stat`` over pair resamples (undefined resamples left out)."""
    rng = np.random.default_rng(seed)
    t, p = np.asarray(truth), np.asarray(predicted)
    values = []
    for idx in rng.integers(0, len(t), size=(BOOTSTRAP_RESAMPLES, len(t))):
        v = stat(list(t[idx]), list(p[idx]))
        if v is not None:
            values.append(v)
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _human_check(name: str, estimate: float | None, se: float | None, n: int, threshold: float,
                 min_labels: int) -> Check:
    if n == 0:
        return Check(None, threshold, False, ">=", "not computed: no human labels")
    if estimate is None or se is None:
        return Check(None, threshold, False, ">=", f"not computed: {name} is undefined on these {n} labels "
                                                   "(one label only)")
    low = estimate - normal_quantile(LEVEL) * se
    passed = n >= min_labels and low >= threshold
    why = (f"estimate {estimate:.3f}, {int(LEVEL * 100)}% lower bound {low:.3f} (SE {se:.3f}) on {n} labels"
           + ("" if n >= min_labels else f"; fewer than {min_labels} labels"))
    return Check(round(estimate, 6), threshold, passed, ">=", why)


def _needed(name: str, estimate: float | None, se: float | None, n: int, threshold: float) -> tuple[int | None, str]:
    if estimate is None or se is None:
        return None, f"{name} not computed"
    if estimate <= threshold:
        return None, (f"{name} {estimate:.3f} is not above its threshold {threshold:.3f}: more labels at this "
                      "agreement cannot certify the judge")
    return math.ceil(n * (normal_quantile(LEVEL) * se / (estimate - threshold)) ** 2), ""


def labels_needed(stats: Mapping[str, tuple[float | None, float | None]], n: int,
                  thresholds: Mapping[str, float], min_labels: int) -> tuple[int | None, str]:
    """Human labels at which every statistic's lower bound (estimate - z SE, SE shrinking as
    1/sqrt(n)) would clear its threshold at its current estimate; at least ``min_labels``.
    ``stats``: name -> (estimate, standard error at ``n`` labels)."""
    if n == 0:
        return min_labels, f"no human labels yet: at least min_human_labels={min_labels} are needed"
    needs, reasons = [], []
    for name, (estimate, se) in stats.items():
        need, why = _needed(name, estimate, se, n, thresholds[name])
        if need is None:
            reasons.append(why)
        needs.append(need)
    if reasons:
        return None, "; ".join(reasons)
    total = max([min_labels, *needs])
    more = max(0, total - n)
    return total, (f"{total} labels in all at the current agreement ({n} now, {more} more)" if more
                   else f"{n} labels are enough at the current agreement")


def certify(judge: PairwiseJudge, rubric: Rubric, human: Sequence[HumanChoice], probes: Sequence[ProbePair],
            thresholds: JudgeThresholds, repeats: int = 2, seed: int = 0, log: Callable[[str], None] = print
            ) -> Certificate:
    """Measure ``judge`` with the pairwise ``rubric`` on ``human`` comparisons and objective
    ``probes``; ``repeats`` calls per pair in the first order (the first plain, the others with
    reformatted whitespace). Cost: (1 + repeats) judge calls per pair."""
    if rubric.kind != "pairwise" or tuple(rubric.choices) != PAIRWISE_CHOICES:
        raise ValueError(f"rubric '{rubric.name}' ({rubric.source}) must be pairwise with choices "
                         f"{list(PAIRWISE_CHOICES)}, got {rubric.kind} {list(rubric.choices)}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    pairs = _pairs(human, probes, seed)
    if not pairs:
        raise ValueError("nothing to certify the judge on: no human labels and no probe pairs")
    per_pair = 1 + repeats
    calls = []
    for p in pairs:
        first = rubric.render(input=p.input_text, reference=p.reference, response_a=p.response_1,
                              response_b=p.response_2)
        swapped = rubric.render(input=p.input_text, reference=p.reference, response_a=p.response_2,
                                response_b=p.response_1)
        calls += [(first, rubric.choices, rubric.version), (swapped, rubric.choices, rubric.version)]
        calls += [(perturb(first, k), rubric.choices, rubric.version) for k in range(1, repeats)]

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            log(f"certifying judge: {done}/{total} calls")

    log(f"certifying judge on {len(human)} human-labelled pairs and {len(probes)} probe pairs "
        f"({len(calls)} calls, rubric {rubric.name}@{rubric.version})")
    verdicts = judge.choose_many(calls, on_done=progress)
    if len(verdicts) != len(calls):
        raise RuntimeError(f"judge returned {len(verdicts)} verdicts for {len(calls)} calls")

    call_failures: list[str] = []
    consistent: list[bool] = []
    stable: list[bool] = []
    combined: dict[str, str] = {}
    for i, p in enumerate(pairs):
        chunk = verdicts[i * per_pair:(i + 1) * per_pair]
        for v in chunk:
            if isinstance(v, Failure):
                call_failures.append(f"{p.key}: {v.error}")
        first, second = chunk[0], chunk[1]
        if isinstance(first, Verdict):
            stable += [v.choice == first.choice for v in chunk[2:] if isinstance(v, Verdict)]
        if isinstance(first, Verdict) and isinstance(second, Verdict):
            one, two = _UNSWAP[0][first.choice], _UNSWAP[1][second.choice]
            consistent.append(one == two)
            combined[p.key] = one if one == two else "tie"

    # objective probe
    probe_pairs = [p for p in pairs if p.source == "probe" and p.key in combined]
    by_kind: dict[str, list[bool]] = {}
    for p in probe_pairs:
        by_kind.setdefault(p.kind, []).append(combined[p.key] == p.truth)
    probe_accuracy = _share([ok for oks in by_kind.values() for ok in oks])
    probe_stats = {"n": len(probe_pairs), "accuracy": probe_accuracy,
                   "by_kind": {k: {"n": len(v), "accuracy": _share(v)} for k, v in sorted(by_kind.items())}}

    # agreement with people
    judged_human = [p for p in pairs if p.source == "human" and p.key in combined]
    truth = [p.truth for p in judged_human]
    predicted = [combined[p.key] for p in judged_human]
    n = len(judged_human)
    kappa = cohen_kappa(truth, predicted) if n else None
    bal = balanced_accuracy(truth, predicted) if n else None
    kappa_se = _bootstrap_se(cohen_kappa, truth, predicted, seed) if kappa is not None else None
    bal_se = _bootstrap_se(balanced_accuracy, truth, predicted, seed) if bal is not None else None
    human_stats: dict[str, Any] = {
        "n": n, "labels": list(LABELS),
        "confusion_matrix": confusion(truth, predicted, LABELS) if n else "not computed",
        "kappa": kappa if kappa is not None else "not computed",
        "kappa_se": kappa_se if kappa_se is not None else "not computed",
        "balanced_accuracy": bal if bal is not None else "not computed",
        "balanced_accuracy_se": bal_se if bal_se is not None else "not computed"}

    # length bias, on every pair whose better answer is known
    longer_judge, longer_truth = [], []
    by_source: dict[str, tuple[list[bool], list[bool]]] = {}
    for p in pairs:
        if p.key not in combined or p.truth == "tie" or len(p.response_1) == len(p.response_2):
            continue
        longer = "1" if len(p.response_1) > len(p.response_2) else "2"
        longer_judge.append(combined[p.key] == longer)
        longer_truth.append(p.truth == longer)
        by_source.setdefault(p.source, ([], []))[0].append(combined[p.key] == longer)
        by_source[p.source][1].append(p.truth == longer)
    length_bias = (_share(longer_judge) - _share(longer_truth)) if longer_judge else None  # type: ignore[operator]
    length_stats = {"n": len(longer_judge), "judge_picks_longer": _share(longer_judge),
                    "better_is_longer": _share(longer_truth), "excess": length_bias,
                    "by_source": {s: {"n": len(j), "judge_picks_longer": _share(j), "better_is_longer": _share(t)}
                                  for s, (j, t) in sorted(by_source.items())}}

    t = thresholds
    position = _share(consistent)
    stability = _share(stable)

    def at_least(value: float | None, threshold: float, what: str, count: int) -> Check:
        if value is None:
            return Check(None, threshold, False, ">=", f"not computed: no {what}")
        return Check(round(value, 6), threshold, value >= threshold, ">=", f"{value:.3f} over {count} {what}")

    checks = {
        "position_consistency": at_least(position, t.min_position_consistency, "pairs judged in both orders",
                                         len(consistent)),
        "repeat_stability": at_least(stability, t.min_repeat_stability, "repeated calls", len(stable)),
        "probe_accuracy": at_least(probe_accuracy, t.min_probe_accuracy, "probe pairs", len(probe_pairs)),
        "length_bias": (Check(None, t.max_length_bias, False, "<=", "not computed: no pair with a known better "
                                                                   "answer of a different length")
                        if length_bias is None else
                        Check(round(length_bias, 6), t.max_length_bias, length_bias <= t.max_length_bias, "<=",
                              f"judge picks the longer answer {length_stats['judge_picks_longer']:.3f}, the better "
                              f"answer is the longer {length_stats['better_is_longer']:.3f} of {len(longer_judge)} "
                              "pairs")),
        "human_labels": Check(float(n), float(t.min_human_labels), n >= t.min_human_labels, ">=",
                              f"{n} human-labelled pairs judged"),
        "human_kappa": _human_check("kappa", kappa, kappa_se, n, t.min_human_kappa, t.min_human_labels),
        "balanced_accuracy": _human_check("balanced accuracy", bal, bal_se, n, t.min_balanced_accuracy,
                                          t.min_human_labels),
    }
    needed, needed_reason = labels_needed(
        {"kappa": (kappa, kappa_se), "balanced accuracy": (bal, bal_se)}, n,
        {"kappa": t.min_human_kappa, "balanced accuracy": t.min_balanced_accuracy}, t.min_human_labels)
    failures = [f"{name}: {c.detail} (needs {c.direction} {c.threshold})" for name, c in checks.items()
                if not c.passed]
    statistics = {"pairs": len(pairs), "calls": len(calls), "call_failures": len(call_failures),
                  "call_failure_examples": call_failures[:10], "repeats": repeats,
                  "perturbation": "line breaks repeated (k+1 times on repeat k)",
                  "position": {"n": len(consistent), "consistency": position},
                  "stability": {"n": len(stable), "stability": stability},
                  "probe": probe_stats, "human": human_stats, "length_bias": length_stats,
                  "level": LEVEL}
    passed = all(c.passed for c in checks.values())
    log(f"judge certificate: {'PASSED' if passed else 'FAILED'}"
        + ("" if passed else f" ({'; '.join(failures)})"))
    return Certificate(passed, checks, failures, needed, needed_reason, statistics)


def judge_trust(certificate: Mapping[str, Any], judge_model: str, judge_url: str,
                rubric: str | None = None) -> tuple[bool, str]:
    """Whether the judge_certificate value ``certificate`` certifies this judge (model and URL)
    and, when given, this pairwise rubric (``name@version``); with the reason in words."""
    run = certificate.get("mlflow_run_id", "?")
    if not certificate.get("certified"):
        failed = (certificate.get("certificate") or {}).get("failures") or []
        return False, (f"UNCERTIFIED judge {judge_model}: its certificate (MLflow run {run}) failed"
                       + (f": {'; '.join(failed[:3])}" if failed else ""))
    if (certificate.get("judge_model"), certificate.get("judge_url")) != (judge_model, judge_url):
        return False, (f"UNCERTIFIED judge {judge_model} at {judge_url}: the certificate (MLflow run {run}) is for "
                       f"{certificate.get('judge_model')} at {certificate.get('judge_url')}")
    if rubric is not None and certificate.get("rubric") != rubric:
        return False, (f"UNCERTIFIED rubric {rubric}: the certificate (MLflow run {run}) is for rubric "
                       f"{certificate.get('rubric')}")
    return True, f"judge {judge_model} certified with rubric {certificate.get('rubric')} (MLflow run {run})"


def trust_tags(certified: bool, certificate: Mapping[str, Any]) -> dict[str, str]:
    """MLflow tags of a run whose numbers come from a judge: whether they may count, and which
    certificate run says so."""
    return {"genops.judge_certified": str(bool(certified)).lower(),
            "genops.judge_certificate_run_id": str(certificate.get("mlflow_run_id", ""))}
