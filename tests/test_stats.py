"""Bootstrap intervals, paired bootstrap and paired t-test on hand-checkable cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gcsl.metrics.stats import holm_adjust, mean_ci, paired_bootstrap, paired_ttest


def test_mean_ci_constant_values_give_a_point_interval():
    r = mean_ci([0.25] * 7, n_boot=500, seed=3)
    assert (r.mean, r.low, r.high, r.n) == (0.25, 0.25, 0.25, 7)
    assert r.note is None


def test_mean_ci_two_values_hand_checked():
    # resampled means of [0, 1] are 0, 0.5, 1 with chances 1/4, 1/2, 1/4
    r = mean_ci([0.0, 1.0], confidence=0.95, n_boot=20_000, seed=0)
    assert r.mean == 0.5
    assert (r.low, r.high) == (0.0, 1.0)
    # the central 40% lies inside the 50% mass at 0.5
    r40 = mean_ci([0.0, 1.0], confidence=0.4, n_boot=20_000, seed=0)
    assert (r40.low, r40.high) == (0.5, 0.5)


def test_mean_ci_width_matches_normal_theory_for_large_n():
    values = np.random.default_rng(1).normal(10.0, 2.0, size=400)
    r = mean_ci(values, n_boot=4000, seed=0)
    half_width = 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    assert r.low < r.mean < r.high
    assert (r.high - r.low) / 2 == pytest.approx(half_width, rel=0.1)


def test_mean_ci_is_deterministic_given_seed():
    values = np.random.default_rng(2).random(50)
    a, b = mean_ci(values, n_boot=1500, seed=7), mean_ci(values, n_boot=1500, seed=7)
    c = mean_ci(values, n_boot=1500, seed=8)
    assert a == b
    assert (a.low, a.high) != (c.low, c.high)


def test_mean_ci_edge_cases():
    empty = mean_ci([], n_boot=10)
    assert empty.n == 0 and math.isnan(empty.mean) and empty.note == "no values"
    one = mean_ci([3.0], n_boot=10)
    assert (one.mean, one.low, one.high) == (3.0, 3.0, 3.0) and "degenerate" in one.note
    with pytest.raises(ValueError, match="finite"):
        mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0], confidence=1.0)
    with pytest.raises(ValueError, match="n_boot"):
        mean_ci([1.0], n_boot=0)


def test_paired_bootstrap_identical_systems():
    a = {f"p{i}": float(i % 3) for i in range(20)}
    r = paired_bootstrap(a, dict(a), n_boot=500, seed=0)
    assert (r.diff, r.low, r.high, r.p_value, r.n) == (0.0, 0.0, 0.0, 1.0, 20)
    assert r.mean_a == r.mean_b == pytest.approx(np.mean(list(a.values())))


def test_paired_bootstrap_constant_shift():
    # B is A minus 1 on every unit: every resampled difference is exactly 1
    a = {f"u{i}": v for i, v in enumerate([0.2, 0.9, 0.4, 0.7])}
    b = {u: v - 1.0 for u, v in a.items()}
    r = paired_bootstrap(a, b, n_boot=999, seed=0)
    assert r.diff == pytest.approx(1.0)
    assert (r.low, r.high) == pytest.approx((1.0, 1.0))
    assert r.p_value == pytest.approx(1 / 1000)
    assert r.mean_a == pytest.approx(0.55) and r.mean_b == pytest.approx(-0.45)


def test_paired_bootstrap_is_paired_not_independent():
    # large spread across units, small consistent gain: pairing makes the interval exclude 0
    rng = np.random.default_rng(0)
    base = rng.normal(0, 10, size=60)
    a = {i: float(x + 0.5) for i, x in enumerate(base)}
    b = {i: float(x) for i, x in enumerate(base)}
    r = paired_bootstrap(a, b, n_boot=2000, seed=1)
    assert r.low == pytest.approx(0.5) and r.high == pytest.approx(0.5)
    unpaired_width = 2 * 1.96 * base.std(ddof=1) * math.sqrt(2 / base.size)
    assert unpaired_width > 5  # an independent comparison could not tell the two apart


def test_paired_bootstrap_p_value_and_interval_for_noisy_gain():
    rng = np.random.default_rng(5)
    d = rng.normal(0.3, 1.0, size=200)
    a = {i: float(x) for i, x in enumerate(d)}
    b = {i: 0.0 for i in range(200)}
    r = paired_bootstrap(a, b, n_boot=4000, seed=2)
    se = d.std(ddof=1) / math.sqrt(d.size)
    assert r.diff == pytest.approx(d.mean())
    assert r.low == pytest.approx(d.mean() - 1.96 * se, abs=0.3 * se)
    assert r.p_value < 0.001
    # no effect: p is large
    null = paired_bootstrap({i: float(x) for i, x in enumerate(rng.normal(0, 1, 200))}, b, n_boot=2000, seed=2)
    assert null.p_value > 0.05 or null.low < 0 < null.high


def test_paired_bootstrap_reports_unshared_units_and_is_order_independent():
    a = {"x": 1.0, "y": 0.0, "z": 1.0, "only_a": 5.0}
    b = {"z": 0.0, "y": 0.0, "x": 0.5, "only_b": 9.0}
    r1 = paired_bootstrap(a, b, n_boot=300, seed=4)
    r2 = paired_bootstrap(dict(reversed(list(a.items()))), dict(reversed(list(b.items()))), n_boot=300, seed=4)
    assert r1 == r2
    assert (r1.n, r1.only_a, r1.only_b) == (3, 1, 1)
    assert r1.mean_a == pytest.approx(2 / 3) and r1.diff == pytest.approx(0.5)
    assert "left out" in r1.note
    none = paired_bootstrap({"a": 1.0}, {"b": 1.0}, n_boot=10)
    assert none.n == 0 and math.isnan(none.diff) and "no shared units" in none.note


def test_paired_ttest_hand_computed():
    # differences 1, 2, 2: mean 5/3, sd sqrt(1/3), t = (5/3) / (sqrt(1/3)/sqrt(3)) = 5;
    # df = 2: two-sided p = 1 - t / sqrt(t^2 + 2)
    r = paired_ttest([1.0, 2.0, 3.0], [0.0, 0.0, 1.0])
    assert r.t == pytest.approx(5.0)
    assert r.p_value == pytest.approx(1 - 5 / math.sqrt(27))
    assert (r.n, r.mean_diff, r.note) == (3, pytest.approx(5 / 3), None)


def test_paired_ttest_pairs_mappings_by_seed():
    r = paired_ttest({0: 1.0, 1: 2.0, 2: 3.0}, {2: 1.0, 0: 0.0, 1: 0.0})
    assert r.t == pytest.approx(5.0)
    with pytest.raises(ValueError, match="different seeds"):
        paired_ttest({0: 1.0, 1: 2.0}, {0: 1.0, 5: 2.0})
    with pytest.raises(ValueError, match="one value per seed"):
        paired_ttest([1.0, 2.0], [1.0])


def test_paired_ttest_undefined_cases_return_nan_with_note():
    one = paired_ttest([0.5], [0.4])
    assert one.n == 1 and math.isnan(one.t) and math.isnan(one.p_value) and "at least 2" in one.note
    assert one.mean_diff == pytest.approx(0.1)
    same = paired_ttest([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert math.isnan(same.p_value) and "zero variance" in same.note
    shifted = paired_ttest([3.0, 4.0], [2.0, 3.0])
    assert math.isnan(shifted.t) and "exactly 1" in shifted.note


def test_holm_adjust_hand_computed_and_monotone():
    # m = 4: sorted p 0.005, 0.01, 0.03, 0.04 -> 0.02, 0.03, 0.06, 0.06 (the last raised to the one before it)
    assert holm_adjust([0.04, 0.005, 0.03, 0.01]) == pytest.approx([0.06, 0.02, 0.06, 0.03])
    # capped at 1; a NaN (a test that could not run) stays NaN and does not count in m
    out = holm_adjust([0.6, float("nan"), 0.2])
    assert out[0] == pytest.approx(0.6) and math.isnan(out[1]) and out[2] == pytest.approx(0.4)
    assert holm_adjust([0.5, 0.7]) == [1.0, 1.0] and holm_adjust([]) == []
