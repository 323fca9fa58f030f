"""Interval, agreement and pass@k arithmetic against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from genops_assets.lib.stats import (
    accuracy,
    balanced_accuracy,
    bootstrap_ci,
    cohen_kappa,
    confusion,
    paired_difference_ci,
    pass_at_k,
    pass_hat_k,
    percentile,
    ppi_mean,
    unpaired_difference_ci,
    win_rates,
)


@pytest.mark.parametrize("values", [
    [0.3],
    [0.5, 0.1],
    [4.0, 1.0, 3.0, 2.0],
    [0.12, 0.5, 0.07, 2.4, 0.9, 0.33, 0.31, 1.7, 0.05, 0.6, 0.8],
    list(np.random.default_rng(3).lognormal(size=97)),
])
@pytest.mark.parametrize("q", [0, 25, 50, 95, 99, 100])
def test_percentile_is_numpy_linear(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_between_two_values_and_without_values():
    # 5 values: the p95 sits at h = 4 * 0.95 = 3.8, between the 4th and 5th sorted value
    assert percentile([0.1, 0.2, 0.3, 0.4, 1.0], 95) == pytest.approx(0.4 + 0.8 * 0.6)
    assert percentile([None, 2.0, float("nan"), 1.0], 50) == pytest.approx(1.5)
    assert percentile([], 95) is None and percentile([None], 95) is None


def test_bootstrap_of_a_constant_is_a_point():
    iv = bootstrap_ci([0.4] * 30)
    assert iv.estimate == iv.low == iv.high == pytest.approx(0.4)


def test_bootstrap_matches_the_normal_approximation_for_a_proportion():
    values = [1.0] * 60 + [0.0] * 40
    iv = bootstrap_ci(values, n_resamples=4000, seed=1)
    half = 1.96 * math.sqrt(0.6 * 0.4 / 100)  # 0.096
    assert iv.estimate == pytest.approx(0.6)
    assert iv.low == pytest.approx(0.6 - half, abs=0.02) and iv.high == pytest.approx(0.6 + half, abs=0.02)
    assert bootstrap_ci(values, seed=1) == bootstrap_ci(values, seed=1), "seeded: reproducible"


def test_paired_difference_uses_pairs():
    cand = [1, 1, 1, 0, 1, 1, 1, 1, 0, 1] * 5
    base = [0, 1, 0, 0, 1, 0, 1, 0, 0, 1] * 5
    iv = paired_difference_ci(cand, base, seed=0)
    assert iv.estimate == pytest.approx(0.4)
    assert 0.2 < iv.low < 0.4 < iv.high < 0.6
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference_ci([1, 2], [1])


def test_win_rates_shares_and_bad_labels():
    rates = win_rates(["win"] * 6 + ["tie"] * 3 + ["loss"], seed=0)
    assert (rates.win.estimate, rates.tie.estimate, rates.loss.estimate) == pytest.approx((0.6, 0.3, 0.1))
    assert rates.win.low <= 0.6 <= rates.win.high and rates.n == 10
    with pytest.raises(ValueError, match="unknown outcomes"):
        win_rates(["win", "draw"])


def test_unpaired_difference_resamples_each_side():
    iv = unpaired_difference_ci([1.0] * 30, [0.0] * 10 + [1.0] * 10, seed=0)
    assert iv.estimate == pytest.approx(0.5) and 0.25 < iv.low < 0.5 < iv.high < 0.75
    assert iv == unpaired_difference_ci([1.0] * 30, [0.0] * 10 + [1.0] * 10, seed=0), "seeded: reproducible"


def test_cohen_kappa_by_hand():
    # observed 3/4; chance: A 0.5*0.25 + B 0.5*0.75 = 0.5; kappa = (0.75 - 0.5) / 0.5
    assert cohen_kappa(["A", "A", "B", "B"], ["A", "B", "B", "B"]) == pytest.approx(0.5)
    assert cohen_kappa(["win", "loss"], ["win", "loss"]) == pytest.approx(1.0)
    # Worse than chance: always disagreeing on a balanced set.
    assert cohen_kappa(["A", "B"], ["B", "A"]) == pytest.approx(-1.0)


@pytest.mark.parametrize("a,b", [
    (["A", "A", "B", "B"], ["A", "B", "B", "B"]),
    (["win", "tie", "loss", "win", "win", "tie"], ["win", "loss", "loss", "tie", "win", "tie"]),
    (["A", "A", "A"], ["B", "B", "B"]),  # never agreeing, each rater with one label: 0
    (["x", "y", "z", "x", "y"], ["x", "y", "z", "x", "y"]),
])
def test_cohen_kappa_and_accuracy_match_scikit_learn(a, b):
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))
    assert accuracy(a, b) == pytest.approx(sum(x == y for x, y in zip(a, b, strict=True)) / len(a))


def test_cohen_kappa_is_not_computed_when_both_raters_use_one_label():
    """Chance agreement is 1, kappa 0/0 (scikit-learn: NaN): None, which no threshold passes."""
    assert math.isnan(cohen_kappa_score(["win", "win"], ["win", "win"]))
    assert cohen_kappa(["win", "win"], ["win", "win"]) is None
    with pytest.raises(ValueError, match="equally long"):
        cohen_kappa(["win"], ["win", "loss"])


def test_pass_at_k_and_pass_hat_k_by_hand():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 4, 2) == 1.0
    assert pass_hat_k(5, 2, 2) == pytest.approx(1 / 10)
    assert pass_hat_k(5, 5, 5) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_three_class_agreement_by_hand():
    """truth 1 1 1 2 2 tie, predicted 1 1 2 2 tie tie.
    Confusion (rows truth 1/2/tie, columns predicted): [[2,1,0],[0,1,1],[0,0,1]].
    Observed agreement 4/6; chance (3*2 + 2*2 + 1*2) / 36 = 1/3; kappa (2/3 - 1/3) / (2/3) = 0.5.
    Balanced accuracy: recalls 2/3, 1/2, 1/1 -> 0.7222."""
    truth, predicted = ["1", "1", "1", "2", "2", "tie"], ["1", "1", "2", "2", "tie", "tie"]
    assert confusion(truth, predicted, ["1", "2", "tie"]) == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert cohen_kappa(truth, predicted) == pytest.approx(0.5)
    assert balanced_accuracy(truth, predicted) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # Always naming the majority class: plain accuracy 0.5, balanced accuracy 1/3.
    assert accuracy(truth, ["1"] * 6) == 0.5 and balanced_accuracy(truth, ["1"] * 6) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match=r"labels \['both_bad'\] are not among"):
        confusion(["both_bad"], ["1"], ["1", "2", "tie"])


def test_ppi_mean_by_hand():
    """Judge on 4 unlabelled items 1 0 1 1 (mean 0.75, variance 0.25); on 3 labelled items
    1 0 1 where people said 1 1 0: rectifier 0 1 -1 (mean 0, variance 1). Estimate 0.75;
    SE sqrt(0.25/4 + 1/3) = 0.629153; 95% interval 0.75 -/+ 1.959964 * 0.629153."""
    iv = ppi_mean([1, 0, 1, 1], [1, 0, 1], [1, 1, 0])
    assert iv.estimate == pytest.approx(0.75)
    assert iv.low == pytest.approx(0.75 - 1.959964 * 0.629153, abs=1e-5)
    assert iv.high == pytest.approx(0.75 + 1.959964 * 0.629153, abs=1e-5)
    with pytest.raises(ValueError, match="at least 2 unlabelled and 2 labelled"):
        ppi_mean([1, 0], [1], [1])
    with pytest.raises(ValueError, match="differ in length"):
        ppi_mean([1, 0], [1, 0], [1])


def test_ppi_interval_covers_the_truth_where_the_biased_judge_alone_does_not():
    """People prefer the candidate with probability 0.6; a judge agrees with them 80% of the
    time, so it alone estimates 0.6 * 0.8 + 0.4 * 0.2 = 0.56 (biased). Over 2000 seeded repeats
    of 400 judged items, 40 of them also human-labelled, the 95% prediction-powered interval
    covers 0.6 in about 95% of repeats; the judge-only normal interval in about two thirds."""
    rng = np.random.default_rng(7)
    truth, repeats, big_n, n = 0.6, 2000, 360, 40
    covered = judge_only_covered = 0
    for _ in range(repeats):
        human = rng.random(big_n + n) < truth
        judge = np.where(rng.random(big_n + n) < 0.8, human, ~human).astype(float)
        iv = ppi_mean(judge[:big_n], judge[big_n:], human[big_n:].astype(float))
        covered += iv.low <= truth <= iv.high
        se = judge.std(ddof=1) / math.sqrt(judge.size)
        judge_only_covered += abs(judge.mean() - truth) <= 1.96 * se
    assert 0.93 <= covered / repeats <= 0.97
    assert judge_only_covered / repeats < 0.75  # about 0.64: its interval sits around 0.56
