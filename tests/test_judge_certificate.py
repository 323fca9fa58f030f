"""The judge certificate's statistics against hand-computed values, and its verdict on a judge
that always answers "A" (fails) and on an oracle judge (passes).

The judges here are test doubles of a ChatJudge (``choose_many`` over rendered rubric
messages); the code under test is the certificate."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from genops_assets.lib.judge_certificate import (
    HumanChoice,
    certify,
    human_choices_from_frame,
    labels_needed,
    perturb,
)
from genops_assets.lib.judging import BUILTIN_RUBRICS, Failure, Verdict, load_rubrics
from genops_assets.lib.probes import probe_pairs
from genops_assets.lib.tasks import JudgeThresholds, load_task

REPO = Path(__file__).resolve().parents[1]
RUBRIC = load_rubrics(BUILTIN_RUBRICS)["pairwise_quality"]
SPEC = load_task(REPO / "tasks", "support_triage")


def golden_probes(n: int = 6):
    rows = []
    with open(SPEC.root / "examples.jsonl") as f:
        for i, line in enumerate(f):
            if i >= n:
                break
            ex = json.loads(line)
            rows.append((f"ex{i:02d}", ex["message"], {k: ex[k] for k in ("category", "priority", "product",
                                                                            "summary")}))
    return probe_pairs(rows, SPEC)


def sides(messages) -> tuple[str, str]:
    """The texts shown as response A and B in a rendered pairwise_quality prompt."""
    user = messages[-1]["content"]
    a_at, b_at = user.index("Response A:"), user.index("Response B:")
    return user[a_at:b_at], user[b_at:user.index("Which response is better?")]


class ScriptedJudge:
    """Answers each call with ``decide(text_a, text_b) -> "A" | "B" | "C"``; counts calls."""

    def __init__(self, decide):
        self.decide = decide
        self.calls: list = []

    def choose_many(self, items, on_done=None):
        out = []
        for i, (messages, choices, _version) in enumerate(items):
            self.calls.append(messages)
            choice = self.decide(*sides(messages))
            out.append(Verdict(choice, {c: float(c == choice) for c in choices}))
            if on_done:
                on_done(i + 1, len(items))
        return out


def oracle(better: set[str]):
    """Picks the side showing a text of ``better``; C when neither or both do."""
    def decide(a: str, b: str) -> str:
        in_a = any(t in a for t in better)
        in_b = any(t in b for t in better)
        return "A" if in_a and not in_b else "B" if in_b and not in_a else "C"
    return decide


def human_set(n: int) -> tuple[list[HumanChoice], set[str]]:
    """``n`` comparisons: people prefer response 1 on even items, response 2 on odd ones, and
    the better text is the shorter one on every third item (so length alone does not decide)."""
    humans, better = [], set()
    for i in range(n):
        good, bad = f'{{"answer": "right {i}"}}', f'{{"answer": "wrong answer number {i}, longer"}}'
        if i % 3 == 0:
            good, bad = f'{{"answer": "ok {i}"}}', f'{{"answer": "wrong {i}"}}'[:len(f"ok {i}") + 10] + "x" * 30
        better.add(good)
        r1, r2, choice = (good, bad, "1") if i % 2 == 0 else (bad, good, "2")
        humans.append(HumanChoice(f"item{i}", f"question {i}", "(none)", r1, r2, choice))
    return humans, better


THRESHOLDS = JudgeThresholds(min_human_labels=10)


def test_a_judge_that_always_answers_a_fails():
    humans, _ = human_set(12)
    probes = golden_probes()
    judge = ScriptedJudge(lambda a, b: "A")
    cert = certify(judge, RUBRIC, humans, probes, THRESHOLDS, repeats=2, log=lambda m: None)
    assert not cert.passed
    c = cert.checks
    # "A" in both orders names response 1 first and response 2 second: never consistent, so
    # every combined verdict is a tie.
    assert c["position_consistency"].value == 0.0 and not c["position_consistency"].passed
    # Whitespace does not move a judge that ignores its input: stable, and that alone passes.
    assert c["repeat_stability"].value == 1.0 and c["repeat_stability"].passed
    # A tie is never the probe's right answer.
    assert c["probe_accuracy"].value == 0.0
    # People chose 1 or 2 (never tie); the judge always tie: observed agreement 0, chance
    # agreement 0 (the judge's marginal is all on tie, the people's none), kappa = 0.
    assert c["human_kappa"].value == 0.0 and not c["human_kappa"].passed
    # Recall of class 1 = 0/6, of class 2 = 0/6: balanced accuracy 0.
    assert c["balanced_accuracy"].value == 0.0
    assert cert.statistics["human"]["confusion_matrix"] == [[0, 0, 6], [0, 0, 6], [0, 0, 0]]
    assert cert.labels_needed is None and "cannot certify" in cert.labels_needed_reason
    assert {f.split(":")[0] for f in cert.failures} == {"position_consistency", "probe_accuracy", "human_kappa",
                                                      "balanced_accuracy"}
    # (1 + repeats) calls per pair: 12 human pairs and the probes.
    assert len(judge.calls) == 3 * (12 + len(probes))


def test_an_oracle_judge_passes():
    humans, better = human_set(12)
    probes = golden_probes()
    judge = ScriptedJudge(oracle(better | {p.good for p in probes}))
    cert = certify(judge, RUBRIC, humans, probes, THRESHOLDS, repeats=3, log=lambda m: None)
    assert cert.passed, cert.failures
    c = cert.checks
    assert c["position_consistency"].value == 1.0 and c["repeat_stability"].value == 1.0
    assert c["probe_accuracy"].value == 1.0 and c["human_kappa"].value == 1.0
    assert c["balanced_accuracy"].value == 1.0
    assert set(cert.statistics["probe"]["by_kind"]) == {"wrong_label", "broken_json", "truncated"}
    assert all(k["accuracy"] == 1.0 for k in cert.statistics["probe"]["by_kind"].values())
    # It picks exactly what the truth picks: no excess taste for length.
    assert c["length_bias"].value == 0.0
    # Perfect agreement: zero standard error, so the floor min_human_labels is what is needed.
    assert cert.labels_needed == 10
    assert cert.as_dict()["passed"] is True and json.dumps(cert.as_dict())


def test_the_same_oracle_with_too_few_labels_is_not_certified():
    humans, better = human_set(4)
    judge = ScriptedJudge(oracle(better))
    cert = certify(judge, RUBRIC, humans, [], THRESHOLDS, log=lambda m: None)
    assert not cert.passed
    assert not cert.checks["human_labels"].passed and "fewer than 10 labels" in cert.checks["human_kappa"].detail
    assert cert.checks["probe_accuracy"].value is None  # no probes: not computed, and failed
    assert cert.labels_needed == 10


def test_without_human_labels_the_human_statistics_are_not_computed():
    probes = golden_probes(3)
    judge = ScriptedJudge(oracle({p.good for p in probes}))
    cert = certify(judge, RUBRIC, [], probes, THRESHOLDS, log=lambda m: None)
    assert not cert.passed
    assert cert.checks["probe_accuracy"].value == 1.0 and cert.checks["position_consistency"].value == 1.0
    for name in ("human_kappa", "balanced_accuracy"):
        assert cert.checks[name].value is None and cert.checks[name].detail.startswith("not computed")
    assert cert.statistics["human"]["kappa"] == "not computed"
    assert cert.labels_needed == THRESHOLDS.min_human_labels and "no human labels" in cert.labels_needed_reason


def test_statistics_of_a_scripted_judge_by_hand():
    """Six human pairs, both orders scripted per item:

    item  human  order 1 (r1 as A)  order 2 (r2 as A)  un-swapped       combined
    h0    1      A -> 1             B -> 1             consistent       1
    h1    1      A -> 1             B -> 1             consistent       1
    h2    1      B -> 2             A -> 2             consistent       2
    h3    2      B -> 2             A -> 2             consistent       2
    h4    2      A -> 1             A -> 2             inconsistent     tie
    h5    tie    C -> tie           C -> tie           consistent       tie

    position consistency 5/6. Confusion (rows human 1/2/tie, columns judge 1/2/tie):
    [[2,1,0],[0,1,1],[0,0,1]]. Agreement 4/6; chance (3*2 + 2*2 + 1*2)/36 = 1/3;
    kappa (2/3 - 1/3) / (2/3) = 0.5. Balanced accuracy (2/3 + 1/2 + 1) / 3 = 0.7222.
    Length: r1 is longer in every pair. Decisive human pairs h0-h4: people prefer the longer
    in 3 of 5 (0.6); the judge picks the longer (combined 1) in 2 of 5 (0.4): excess -0.2.
    Repeats (whitespace changed): h2's verdict flips to A, the rest hold: 5/6 stable.
    """
    script = {0: ("A", "B"), 1: ("A", "B"), 2: ("B", "A"), 3: ("B", "A"), 4: ("A", "A"), 5: ("C", "C")}
    human = ["1", "1", "1", "2", "2", "tie"]
    humans = [HumanChoice(f"h{i}", f"q{i}", "(none)", f"long answer {i} xxxxxxxx", f"short {i}", human[i])
              for i in range(6)]

    def decide_messages(messages):
        a, _ = sides(messages)
        i = int(a.split()[-2] if "long answer" in a else a.split()[-1])
        first = "long answer" in a
        if not first:
            return script[i][1]
        if "\n\n\n" in messages[-1]["content"] and i == 2:  # the perturbed repeat of h2
            return "A"
        return script[i][0]

    class Judge(ScriptedJudge):
        def choose_many(self, items, on_done=None):
            return [Verdict(decide_messages(m), {}) for m, _c, _v in items]

    cert = certify(Judge(None), RUBRIC, humans, [], JudgeThresholds(min_human_labels=6), log=lambda m: None)
    s = cert.statistics
    assert cert.checks["position_consistency"].value == pytest.approx(5 / 6, abs=1e-6)
    assert s["human"]["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert s["human"]["kappa"] == pytest.approx(0.5)
    assert s["human"]["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert s["length_bias"]["judge_picks_longer"] == pytest.approx(0.4)
    assert s["length_bias"]["better_is_longer"] == pytest.approx(0.6)
    assert cert.checks["length_bias"].value == pytest.approx(-0.2) and cert.checks["length_bias"].passed
    assert cert.checks["repeat_stability"].value == pytest.approx(5 / 6, abs=1e-6)


def test_failed_calls_leave_their_pairs_out():
    humans, better = human_set(4)
    ok = ScriptedJudge(oracle(better))

    class Flaky:
        def choose_many(self, items, on_done=None):
            out = ok.choose_many(items)
            out[0] = Failure("APIConnectionError: refused")  # h0's first order
            return out

    cert = certify(Flaky(), RUBRIC, humans, [], THRESHOLDS, log=lambda m: None)
    assert cert.statistics["call_failures"] == 1 and cert.statistics["position"]["n"] == 3
    assert cert.statistics["human"]["n"] == 3 and cert.statistics["stability"]["n"] == 3


def test_labels_needed_from_the_standard_error():
    # kappa 0.6 with SE 0.1 on 20 labels, threshold 0.4: n = 20 * (1.96 * 0.1 / 0.2)^2 = 19.2 -> 20;
    # balanced accuracy 0.8, SE 0.1, threshold 0.7: n = 20 * (1.96 * 0.1 / 0.1)^2 = 76.8 -> 77.
    need, why = labels_needed({"kappa": (0.6, 0.1), "balanced accuracy": (0.8, 0.1)}, 20,
                              {"kappa": 0.4, "balanced accuracy": 0.7}, 30)
    assert need == 77 and "57 more" in why
    need, why = labels_needed({"kappa": (0.3, 0.1), "balanced accuracy": (0.8, 0.1)}, 20,
                              {"kappa": 0.4, "balanced accuracy": 0.7}, 30)
    assert need is None and "kappa 0.300 is not above its threshold 0.400" in why


def test_perturbation_changes_only_whitespace():
    msgs = [{"role": "user", "content": "a\nb\n\nc"}]
    assert perturb(msgs, 1)[0]["content"] == "a\n\nb\n\n\n\nc"
    assert perturb(msgs, 2)[0]["content"].split() == msgs[0]["content"].split()


def test_human_choices_from_the_mart_frame():
    df = pd.DataFrame({"item_id": ["i1", "i2"], "input_text": ["q1", "q2"], "reference_json": [None, '{"a": 1}'],
                       "response_1": ["x", "y"], "response_2": ["z", "w"], "human_choice": ["both_bad", "2"],
                       "split": ["certify", "train"]})
    out = human_choices_from_frame(df, split="certify")
    assert [(h.item_id, h.reference, h.choice) for h in out] == [("i1", "(none)", "both_bad")]
    bad = df.assign(human_choice=["1", "A"])
    with pytest.raises(ValueError, match="item i2: human_choice 'A'"):
        human_choices_from_frame(bad)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['response_2'\]"):
        human_choices_from_frame(df.drop(columns=["response_2"]))


def test_human_outcomes_and_the_prediction_powered_win_rate_need_enough_rows():
    from genops_assets.lib.sxs import human_outcome, ppi_win_rate, version_name

    cand = version_name("support_triage", "v3")
    assert cand == "support_triage:v3" == version_name("support_triage", "3")
    assert human_outcome(cand, "base", "1", cand) == "win" and human_outcome("base", cand, "1", cand) == "loss"
    assert human_outcome("base", cand, "both_bad", cand) == "tie"
    with pytest.raises(ValueError, match="neither model_1 'base' nor model_2 'reference'"):
        human_outcome("base", "reference", "1", cand)
    rows = [{"outcome": "win", "human": "win"}, {"outcome": "loss"}, {"outcome": "win"}, {"outcome": None}]
    out = ppi_win_rate(rows)  # one labelled example: not enough for an interval
    assert out["estimate"] is None and out["reason"].startswith("not computed")
    assert (out["n_labelled"], out["n_unlabelled"]) == (1, 2)
