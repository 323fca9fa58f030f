"""Annotator agreement over the rating store: who rates carefully, which items people agree on.

The order of the rules, applied to one task's items and ratings:

1. **Gold questions.** A rater's accuracy on gold items (``gold_choice`` known) is judged once
   they answered ``feedback.min_gold_answered`` of them; below ``feedback.min_gold_accuracy``
   the rater is excluded: none of their ratings count anywhere (items, pairs, corrections).
2. **Per-rater kappa.** Each rater's choices against the majority of the *other* included
   raters on the same non-gold pairwise items (Cohen's kappa; items where the others tie have
   no majority and are left out). Chosen over the mean of pairwise kappas because a rater
   rarely shares many items with any one colleague, while the others' majority exists on every
   item rated at least twice.
3. **Items.** A pairwise item counts when at least ``feedback.min_item_ratings`` included raters
   rated it and the share choosing the majority reaches ``feedback.min_item_agreement``. A tie
   for the majority (two choices with the most votes) never counts.
4. **Overall kappa** of the included raters on non-gold pairwise items: Cohen's kappa when
   exactly two raters rated such items, Fleiss' kappa beyond (on the items rated at least ``m``
   times, their first ``m`` ratings by time, ``m`` the most common count of ratings per item,
   since Fleiss' kappa needs the same number of ratings on every item).

A kappa that cannot be computed (too few items, every rating the same choice) is None, which
the report shows as "not computed", never a number.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from genops_assets.lib.stats import cohen_kappa
from genops_assets.lib.tasks import Feedback, TaskSpec

__all__ = ["AgreedPair", "AgreementReport", "ItemAgreement", "RaterQuality", "agreed_pairs", "agreement_report",
           "cohen_kappa", "fleiss_kappa", "hash_bucket", "item_agreement", "pair_id", "rater_quality"]

CHOICE_CATEGORIES = ("1", "2", "tie", "both_bad")


def fleiss_kappa(ratings: Sequence[Sequence[str]]) -> float | None:
    """Fleiss' kappa of items each rated by the same number (>= 2) of raters: ``ratings[i]`` is
    the list of choices item ``i`` received (statsmodels' ``fleiss_kappa`` on the counts that
    ``aggregate_raters`` builds). None when it is not defined: fewer than two items, or chance
    agreement 1 (every rating one and the same choice)."""
    if len(ratings) < 2:
        return None
    sizes = {len(r) for r in ratings}
    if len(sizes) != 1 or min(sizes) < 2:
        raise ValueError(f"Fleiss' kappa needs the same number (>= 2) of ratings on every item, got sizes "
                         f"{sorted(sizes)}")
    if len({c for r in ratings for c in r}) == 1:
        return None
    import numpy as np
    from statsmodels.stats.inter_rater import aggregate_raters
    from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss_kappa

    labels = sorted({c for r in ratings for c in r})
    codes = np.array([[labels.index(c) for c in r] for r in ratings])
    table, _ = aggregate_raters(codes, n_cat=len(labels))
    value = float(sm_fleiss_kappa(table, method="fleiss"))
    return None if math.isnan(value) else value


def hash_bucket(key: str) -> float:
    """A stable number in [0, 1) from a key: the dbt ``hash_bucket`` macro over ``sha256(key)``."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 4294967296.0


def pair_id(item_id: str, majority: str) -> str:
    """Identity of a preference pair (the ``preference_pairs`` mart computes the same)."""
    return "pp_" + hashlib.sha256(f"{item_id}:{majority}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RaterQuality:
    task: str
    rater: str
    ratings: int
    gold_answered: int
    gold_accuracy: float | None
    kappa: float | None
    excluded: bool
    reason: str | None


@dataclass(frozen=True)
class ItemAgreement:
    task: str
    item_id: str
    n_ratings: int
    majority_choice: str | None
    agreement: float | None
    included: bool
    reason: str | None


def _is_pairwise_choice(r: Mapping[str, Any]) -> bool:
    return r.get("choice") in CHOICE_CATEGORIES


def _majority(choices: Sequence[str]) -> str | None:
    """The choice with the most votes, None when two choices share the most votes."""
    if not choices:
        return None
    top = Counter(choices).most_common()
    if len(top) > 1 and top[0][1] == top[1][1]:
        return None
    return top[0][0]


def _by_item(items: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {i["item_id"]: i for i in items}


def gold_exclusions(items: Iterable[Mapping[str, Any]], ratings: Sequence[Mapping[str, Any]],
                    feedback: Feedback) -> dict[str, tuple[int, float | None, str | None]]:
    """rater -> (gold answered, gold accuracy or None, reason when excluded or None)."""
    gold = {k: i["gold_choice"] for k, i in _by_item(items).items() if i.get("gold_choice")}
    out: dict[str, tuple[int, float | None, str | None]] = {}
    for rater in sorted({r["rater"] for r in ratings}):
        answered = [r for r in ratings if r["rater"] == rater and r["item_id"] in gold]
        right = sum(r.get("choice") == gold[r["item_id"]] for r in answered)
        accuracy = right / len(answered) if answered else None
        reason = None
        if accuracy is not None and len(answered) >= feedback.min_gold_answered \
                and accuracy < feedback.min_gold_accuracy:
            reason = (f"gold accuracy {accuracy:.2f} < {feedback.min_gold_accuracy:.2f} "
                      f"({right} of {len(answered)} gold questions right)")
        out[rater] = (len(answered), accuracy, reason)
    return out


def rater_quality(task: str, items: Iterable[Mapping[str, Any]], ratings: Sequence[Mapping[str, Any]],
                  feedback: Feedback) -> list[RaterQuality]:
    """One row per rater: ratings given, gold accuracy, kappa against the others' majority,
    and whether (and why) the rater is excluded."""
    items = _by_item(items)
    gold = gold_exclusions(items.values(), ratings, feedback)
    included = {r for r, (_, _, why) in gold.items() if why is None}
    plain = [r for r in ratings if _is_pairwise_choice(r) and not items.get(r["item_id"], {}).get("gold_choice")]
    by_item: dict[str, list[Mapping[str, Any]]] = {}
    for r in plain:
        by_item.setdefault(r["item_id"], []).append(r)
    out = []
    for rater, (answered, accuracy, reason) in gold.items():
        mine, theirs = [], []
        for rows in by_item.values():
            own = [r["choice"] for r in rows if r["rater"] == rater]
            others = _majority([r["choice"] for r in rows if r["rater"] != rater and r["rater"] in included])
            if own and others is not None:
                mine.append(own[0])
                theirs.append(others)
        kappa = cohen_kappa(mine, theirs) if len(mine) >= 2 else None
        out.append(RaterQuality(task, rater, sum(r["rater"] == rater for r in ratings), answered, accuracy, kappa,
                                reason is not None, reason))
    return out


def item_agreement(task: str, items: Iterable[Mapping[str, Any]], ratings: Sequence[Mapping[str, Any]],
                   feedback: Feedback, excluded: Iterable[str] = ()) -> list[ItemAgreement]:
    """One row per pairwise item: ratings of included raters, majority choice, agreement, and
    whether the item passes the agreement rule (with the reason when it does not)."""
    dropped = set(excluded)
    out = []
    for item in sorted(items, key=lambda i: i["item_id"]):
        if item["kind"] != "pairwise":
            continue
        choices = [r["choice"] for r in ratings if r["item_id"] == item["item_id"] and r["rater"] not in dropped
                   and _is_pairwise_choice(r)]
        majority = _majority(choices)
        agreement = (Counter(choices).most_common(1)[0][1] / len(choices)) if choices else None
        reason = None
        if len(choices) < feedback.min_item_ratings:
            reason = f"{len(choices)} rating(s) < {feedback.min_item_ratings} needed"
        elif majority is None:
            reason = f"no majority (tie between choices: {dict(sorted(Counter(choices).items()))})"
        elif agreement is not None and agreement < feedback.min_item_agreement:
            reason = f"agreement {agreement:.2f} < {feedback.min_item_agreement:.2f}"
        out.append(ItemAgreement(task, item["item_id"], len(choices), majority, agreement, reason is None, reason))
    return out


def overall_kappa(items: Iterable[Mapping[str, Any]], ratings: Sequence[Mapping[str, Any]],
                  excluded: Iterable[str] = ()) -> tuple[float | None, str, int]:
    """(kappa, method, items used) of the included raters on non-gold pairwise items."""
    items = _by_item(items)
    dropped = set(excluded)
    rows = sorted((r for r in ratings if _is_pairwise_choice(r) and r["rater"] not in dropped
                   and not items.get(r["item_id"], {}).get("gold_choice")), key=lambda r: (r["ts"], r["rater"]))
    by_item: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_item.setdefault(r["item_id"], []).append(r)
    shared = {k: v for k, v in by_item.items() if len(v) >= 2}
    raters = sorted({r["rater"] for v in shared.values() for r in v})
    if len(raters) < 2:
        return None, "not computed (no item rated by two raters)", 0
    if len(raters) == 2:
        a, b = raters
        pairs = [({r["rater"]: r["choice"] for r in v}) for v in shared.values()]
        if len(pairs) < 2:
            return None, "not computed (fewer than two shared items)", len(pairs)
        return cohen_kappa([p[a] for p in pairs], [p[b] for p in pairs]), "cohen", len(pairs)
    counts = Counter(len(v) for v in shared.values())
    m = max(counts, key=lambda k: (counts[k], k))
    table = [[r["choice"] for r in v[:m]] for v in shared.values() if len(v) >= m]
    return fleiss_kappa(table), f"fleiss (first {m} ratings per item)", len(table)


@dataclass(frozen=True)
class AgreementReport:
    """Everything the agreement rules decided for one task."""

    task: str
    raters: list[RaterQuality]
    items: list[ItemAgreement]
    kappa: float | None
    kappa_method: str
    kappa_items: int

    @property
    def excluded_raters(self) -> list[RaterQuality]:
        return [r for r in self.raters if r.excluded]

    @property
    def excluded_items(self) -> list[ItemAgreement]:
        return [i for i in self.items if not i.included]

    def summary(self) -> dict[str, Any]:
        reasons = Counter(_reason_kind(i.reason) for i in self.excluded_items)
        return {"raters": len(self.raters), "excluded_raters": len(self.excluded_raters),
                "items": len(self.items), "included_items": len(self.items) - len(self.excluded_items),
                "excluded_items": len(self.excluded_items), "kappa": self.kappa, "kappa_method": self.kappa_method,
                "kappa_items": self.kappa_items, "excluded_item_reasons": dict(sorted(reasons.items()))}

    def markdown(self) -> str:
        def num(v: float | None) -> str:
            return "not computed" if v is None else f"{v:.3f}"

        lines = [f"## Annotator agreement: {self.task}", "",
                 f"- overall kappa: **{num(self.kappa)}** ({self.kappa_method}, {self.kappa_items} items)",
                 f"- raters: {len(self.raters)}, excluded {len(self.excluded_raters)}",
                 f"- pairwise items: {len(self.items)}, included {len(self.items) - len(self.excluded_items)}, "
                 f"excluded {len(self.excluded_items)}", ""]
        if self.raters:
            lines += ["| rater | ratings | gold answered | gold accuracy | kappa vs others | excluded | reason |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {r.rater} | {r.ratings} | {r.gold_answered} | {num(r.gold_accuracy)} | {num(r.kappa)} | "
                      f"{'yes' if r.excluded else 'no'} | {r.reason or ''} |" for r in self.raters]
            lines.append("")
        why = Counter(_reason_kind(i.reason) for i in self.excluded_items)
        if why:
            lines += ["Excluded items by reason:", ""] + [f"- {k}: {v}" for k, v in sorted(why.items())]
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict[str, Any]:
        return {**self.summary(), "raters_detail": [asdict(r) for r in self.raters]}


def _reason_kind(reason: str | None) -> str:
    if reason is None:
        return "included"
    if "rating(s) <" in reason:
        return "too few ratings"
    if reason.startswith("no majority"):
        return "no majority (tie)"
    return "agreement below the rule"


def agreement_report(task: str, items: Sequence[Mapping[str, Any]], ratings: Sequence[Mapping[str, Any]],
                     feedback: Feedback) -> AgreementReport:
    """The rules of this module, in order, on one task's items and ratings."""
    raters = rater_quality(task, items, ratings, feedback)
    excluded = [r.rater for r in raters if r.excluded]
    kappa, method, n = overall_kappa(items, ratings, excluded)
    return AgreementReport(task, raters, item_agreement(task, items, ratings, feedback, excluded), kappa, method, n)


@dataclass(frozen=True)
class AgreedPair:
    """A preference pair people agreed on (what the ``preference_pairs`` mart holds)."""

    pair_id: str
    item_id: str
    input_text: str
    chosen: str
    rejected: str
    chosen_model: str
    rejected_model: str
    n_ratings: int
    agreement: float
    source: str
    split: str


def pairs_from(items: Sequence[Mapping[str, Any]], agreement: Sequence[ItemAgreement],
               feedback: Feedback) -> list[AgreedPair]:
    """Included pairwise non-gold items whose majority picks an answer, as chosen / rejected;
    golden-prompt items are always ``heldout``, others by the hash bucket of the item id."""
    by_id = _by_item(items)
    out = []
    for a in agreement:
        item = by_id[a.item_id]
        if not a.included or a.majority_choice not in ("1", "2") or item["source"] == "gold" \
                or item.get("gold_choice"):
            continue
        win, lose = ("1", "2") if a.majority_choice == "1" else ("2", "1")  # included: agreement is set
        heldout = item["source"] == "golden" or hash_bucket(a.item_id) < feedback.heldout_fraction
        out.append(AgreedPair(pair_id(a.item_id, a.majority_choice), a.item_id, item["input_text"],
                              item[f"response_{win}"], item[f"response_{lose}"], item[f"model_{win}"],
                              item[f"model_{lose}"], a.n_ratings, float(a.agreement), item["source"],
                              "heldout" if heldout else "train"))
    return out


def agreed_pairs(store, spec: TaskSpec) -> list[AgreedPair]:
    """The task's agreed preference pairs straight from the rating store (the sensor and the
    ``human_ratings`` asset use this one function). The mart also holds out live items whose
    input is (nearly) a golden-set input, which only the warehouse knows."""
    items = store.items(spec.name)
    report = agreement_report(spec.name, items, store.ratings(spec.name), spec.feedback)
    return pairs_from(items, report.items, spec.feedback)
