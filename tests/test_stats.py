"""Interval, agreement and pass@k arithmetic against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from genops_assets.lib.stats import (
    accuracy,
    bootstrap_ci,
    cohen_kappa,
    paired_difference_ci,
    pass_at_k,
    pass_hat_k,
    percentile,
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
