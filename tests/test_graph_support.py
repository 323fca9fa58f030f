"""The helpers the graph tests compare with."""

from __future__ import annotations

from graph_support import same_numbers


def test_same_numbers_forgives_only_last_digit_float_noise():
    run = {"win": {"estimate": 0.25, "low": 0.0}, "pairs": [3, 0.5], "model": "v1"}
    assert same_numbers(run, {"win": {"estimate": 0.25 + 1e-9, "low": 0.0}, "pairs": [3, 0.5], "model": "v1"})
    assert not same_numbers(run, {"win": {"estimate": 0.251, "low": 0.0}, "pairs": [3, 0.5], "model": "v1"})
    assert not same_numbers(run, {"win": {"estimate": 0.25, "low": 0.0}, "pairs": [3, 0.5], "model": "v2"})
    assert not same_numbers(run, {"win": {"estimate": 0.25}, "pairs": [3, 0.5], "model": "v1"})  # a missing key
    assert not same_numbers(run, {"win": {"estimate": 0.25, "low": 0.0}, "pairs": [3], "model": "v1"})
    assert not same_numbers({"x": 1.0}, {"x": 1.001})
