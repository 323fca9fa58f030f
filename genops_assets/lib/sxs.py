"""AutoSxS: pairwise side-by-side of a candidate against a baseline, plus pointwise rubrics.

Every pair is judged in both orders (candidate as A, then as B). The outcome counts only when
both orders agree; otherwise it is a tie and the pair is flagged position-inconsistent.
Rates come with bootstrap intervals; pointwise rubric scores with paired intervals of the
candidate-minus-baseline difference. Where people compared the same two versions on some of the
examples, a prediction-powered win rate (judge on every example, corrected by the human labels)
stands beside the judge-only one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from genops_assets.lib.judging import ChatJudge, Failure, Rubric, expected_score, pairwise_outcome
from genops_assets.lib.stats import (
    LOSS,
    TIE,
    WIN,
    accuracy,
    bootstrap_ci,
    cohen_kappa,
    paired_difference_ci,
    ppi_mean,
    win_rates,
)


@dataclass(frozen=True)
class SxsRow:
    example_id: str
    input: str
    reference: str
    candidate: str
    baseline: str
    human: str | None = None  # "win" | "tie" | "loss" for the candidate, when people labelled it


@dataclass
class SxsResult:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    failures: list[dict[str, str]] = field(default_factory=list)


def _reference_text(ref: Any) -> str:
    if ref is None or ref == "":
        return "(none)"
    return ref if isinstance(ref, str) else json.dumps(ref, ensure_ascii=False)


def run_sxs(
    judge: ChatJudge,
    pairwise: Rubric,
    pointwise: Sequence[Rubric],
    rows: Sequence[SxsRow],
    log: Callable[[str], None] = print,
    seed: int = 0,
) -> SxsResult:
    if not rows:
        raise ValueError("AutoSxS needs at least one example")
    if pairwise.kind != "pairwise":
        raise ValueError(f"rubric '{pairwise.name}' is {pairwise.kind}, not pairwise")
    items: list[tuple[list[dict[str, str]], tuple[str, ...], str]] = []
    for r in rows:
        ref = _reference_text(r.reference)
        items.append((pairwise.render(input=r.input, reference=ref, response_a=r.candidate, response_b=r.baseline),
                      pairwise.choices, pairwise.version))
        items.append((pairwise.render(input=r.input, reference=ref, response_a=r.baseline, response_b=r.candidate),
                      pairwise.choices, pairwise.version))
        for rub in pointwise:
            for resp in (r.candidate, r.baseline):
                items.append((rub.render(input=r.input, reference=ref, response=resp), rub.choices, rub.version))

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            log(f"judging: {done}/{total} calls")

    verdicts = judge.choose_many(items, on_done=progress)
    per_row = 2 + 2 * len(pointwise)
    out_rows: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    outcomes: list[str] = []
    consistent_flags: list[bool] = []
    point_scores: dict[str, tuple[list[float], list[float]]] = {rub.name: ([], []) for rub in pointwise}
    human_pairs: list[tuple[str, str]] = []
    margins: list[float] = []
    for i, r in enumerate(rows):
        chunk = verdicts[i * per_row : (i + 1) * per_row]
        first, second = chunk[0], chunk[1]
        row: dict[str, Any] = {"example_id": r.example_id, "input": r.input, "reference": _reference_text(r.reference),
                               "candidate": r.candidate, "baseline": r.baseline}
        if isinstance(first, Failure) or isinstance(second, Failure):
            err = (first.error if isinstance(first, Failure) else second.error)  # type: ignore[union-attr]
            failures.append({"example_id": r.example_id, "stage": "pairwise", "error": err})
            row.update(outcome=None, consistent=None, error=err)
        else:
            outcome, consistent = pairwise_outcome(first.choice, second.choice)
            outcomes.append(outcome)
            consistent_flags.append(consistent)
            # Probability margin for the candidate averaged over both orders: a judge's fixed
            # preference for one slot cancels out, what is left is its view of the answers.
            margin = 0.5 * ((first.probabilities.get("A", 0.0) - first.probabilities.get("B", 0.0))
                            + (second.probabilities.get("B", 0.0) - second.probabilities.get("A", 0.0)))
            margins.append(margin)
            row["preference_margin"] = round(margin, 4)
            row.update(outcome=outcome, consistent=consistent, verdict_candidate_first=first.choice,
                       verdict_candidate_second=second.choice,
                       explanation=first.explanation or second.explanation)
            if r.human:
                human_pairs.append((outcome, r.human))
                row["human"] = r.human
        for j, rub in enumerate(pointwise):
            vc, vb = chunk[2 + 2 * j], chunk[3 + 2 * j]
            if isinstance(vc, Failure) or isinstance(vb, Failure):
                err = vc.error if isinstance(vc, Failure) else vb.error  # type: ignore[union-attr]
                failures.append({"example_id": r.example_id, "stage": rub.name, "error": err})
                continue
            sc, sb = expected_score(vc), expected_score(vb)
            point_scores[rub.name][0].append(sc)
            point_scores[rub.name][1].append(sb)
            row[f"{rub.name}_candidate"] = round(sc, 3)
            row[f"{rub.name}_baseline"] = round(sb, 3)
        out_rows.append(row)

    summary: dict[str, Any] = {"examples": len(rows), "judged_pairs": len(outcomes), "failures": len(failures),
                               "pairwise_rubric": f"{pairwise.name}@{pairwise.version}"}
    if outcomes:
        rates = win_rates(outcomes, seed=seed)
        summary["win_rate"] = rates.win.as_dict()
        summary["tie_rate"] = rates.tie.as_dict()
        summary["loss_rate"] = rates.loss.as_dict()
        summary["position_consistency"] = bootstrap_ci([float(c) for c in consistent_flags], seed=seed).as_dict()
        summary["preference_margin"] = bootstrap_ci(margins, seed=seed).as_dict()
    pointwise_summary = {}
    for name, (cand, base) in point_scores.items():
        if cand:
            pointwise_summary[name] = {
                "candidate": bootstrap_ci(cand, seed=seed).as_dict(),
                "baseline": bootstrap_ci(base, seed=seed).as_dict(),
                "delta": paired_difference_ci(cand, base, seed=seed).as_dict(),
                "n": len(cand),
            }
    summary["pointwise"] = pointwise_summary
    if human_pairs:
        judge_labels, human_labels = zip(*human_pairs, strict=True)
        summary["judge_human"] = {"n": len(human_pairs), "accuracy": accuracy(judge_labels, human_labels),
                                  "cohen_kappa": cohen_kappa(judge_labels, human_labels)}
        summary["win_rate_ppi"] = ppi_win_rate(out_rows)
    return SxsResult(out_rows, summary, failures)



def version_name(task: str, version: str) -> str:
    """How ratings name a registered version of a task's model (``support_triage:v3``)."""
    return f"{task}:v{str(version).removeprefix('v')}"


def human_outcome(model_1: str, model_2: str, choice: str, candidate: str) -> str:
    """The candidate's outcome in one human comparison: ``choice`` is a response number, ``tie``
    or ``both_bad`` (neither preferred: a tie)."""
    if candidate not in (model_1, model_2):
        raise ValueError(f"candidate '{candidate}' is neither model_1 '{model_1}' nor model_2 '{model_2}'")
    if choice in ("tie", "both_bad"):
        return TIE
    if choice not in ("1", "2"):
        raise ValueError(f"human choice {choice!r} is not 1, 2, tie or both_bad")
    return WIN if (choice == "1") == (model_1 == candidate) else LOSS


def ppi_win_rate(rows: Sequence[dict[str, Any]], level: float = 0.95) -> dict[str, Any]:
    """Prediction-powered win rate: the judge's wins on the examples nobody labelled, corrected
    by (human win - judge win) on those people labelled. Valid whether or not the judge is
    certified (people anchor it), provided the labelled examples are a random share of them."""
    judged = [r for r in rows if r.get("outcome") is not None]
    labelled = [r for r in judged if r.get("human")]
    unlabelled = [float(r["outcome"] == WIN) for r in judged if not r.get("human")]
    out: dict[str, Any] = {"n_labelled": len(labelled), "n_unlabelled": len(unlabelled)}
    if len(labelled) < 2 or len(unlabelled) < 2:
        return {**out, "estimate": None, "reason": "not computed: needs at least 2 human-labelled and 2 unlabelled "
                                                   "judged examples"}
    interval = ppi_mean(unlabelled, [float(r["outcome"] == WIN) for r in labelled],
                        [float(r["human"] == WIN) for r in labelled], level)
    return {**out, **interval.as_dict()}
