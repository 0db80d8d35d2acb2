"""Graded ranking metrics against hand-computed values and scikit-learn's NDCG."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gcsl.metrics.ranking import (
    dcg_at_k,
    err_at_k,
    hit_at_k,
    ndcg_at_k,
    target_err,
    target_hit,
    target_ndcg,
)

INF = float("inf")


def test_dcg_hand_computed():
    # gains 2^3-1=7, 2^2-1=3, 0, 2^1-1=1; discounts 1, 1/log2(3), 1/2, 1/log2(5)
    expected = 7 + 3 / math.log2(3) + 0 + 1 / math.log2(5)
    assert dcg_at_k([3, 2, 0, 1], k=4) == pytest.approx(expected)
    assert dcg_at_k([3, 2, 0, 1], k=2) == pytest.approx(7 + 3 / math.log2(3))
    # k beyond the list length uses the whole list
    assert dcg_at_k([3, 2, 0, 1], k=50) == pytest.approx(expected)


def test_ndcg_hand_computed():
    # ideal order [3, 2, 1, 0]
    dcg = 7 + 3 / math.log2(3) + 1 / math.log2(5)
    idcg = 7 + 3 / math.log2(3) + 1 / 2
    assert ndcg_at_k([3, 2, 0, 1], k=4) == pytest.approx(dcg / idcg)
    assert ndcg_at_k([3, 2, 1, 0], k=4) == pytest.approx(1.0)
    # at k=1 only the top item counts: a 2 where a 3 was possible
    assert ndcg_at_k([2, 3], k=1) == pytest.approx(3 / 7)


def test_ndcg_with_external_ideal_counts_missing_relevant_items():
    # the list holds one grade-2 item at rank 1, but a grade-3 item exists outside it
    assert ndcg_at_k([2, 0], k=2, ideal_relevance=[3, 2]) == pytest.approx(3 / (7 + 3 / math.log2(3)))


def test_ndcg_edge_cases():
    assert ndcg_at_k([0, 0, 0], k=3) == 0.0
    assert ndcg_at_k([], k=5) == 0.0
    assert dcg_at_k([], k=5) == 0.0
    with pytest.raises(ValueError, match="k must be a positive integer"):
        ndcg_at_k([1], k=0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        ndcg_at_k([1, -1], k=2)
    with pytest.raises(ValueError, match="finite and >= 0"):
        dcg_at_k([float("nan")], k=1)


@pytest.mark.parametrize("seed", range(5))
def test_ndcg_matches_sklearn_with_exponential_gains(seed):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    rel = rng.integers(0, 6, size=30).astype(float)
    # sklearn uses linear gain y_true / log2(i + 1): feed it 2^g - 1 and scores that rank the list as given
    y_true = np.exp2(rel) - 1
    y_score = np.arange(rel.size, 0, -1, dtype=float)
    for k in (1, 5, 10, 30):
        expected = sklearn_metrics.ndcg_score([y_true], [y_score], k=k)
        assert ndcg_at_k(rel, k) == pytest.approx(expected, rel=1e-12)


def test_single_target_ndcg_matches_sklearn_and_list_form():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    n = 40
    for rank, grade in [(1, 5), (3, 4), (10, 1), (11, 5), (40, 3)]:
        rel = np.zeros(n)
        rel[rank - 1] = grade
        y_true = np.exp2(rel) - 1
        y_score = np.arange(n, 0, -1, dtype=float)
        for k in (10, 20):
            single = target_ndcg([rank], [grade], k)[0]
            assert single == pytest.approx(ndcg_at_k(rel, k))
            assert single == pytest.approx(sklearn_metrics.ndcg_score([y_true], [y_score], k=k))


def test_single_target_ndcg_values():
    # one relevant item: the gain cancels, NDCG = 1 / log2(rank + 1) inside the cut-off
    got = target_ndcg([1, 2, 3, 10, 11, INF], [5, 3, 1, 4, 5, 5], k=10)
    expected = [1.0, 1 / math.log2(3), 0.5, 1 / math.log2(11), 0.0, 0.0]
    np.testing.assert_allclose(got, expected)
    # a target of grade 0 has no gain and scores 0
    assert target_ndcg([1], [0], k=10)[0] == 0.0


def test_err_hand_computed():
    # g_max = 3: R = 7/8, 3/8, 0
    assert err_at_k([3, 2, 0], k=3, g_max=3) == pytest.approx(7 / 8 + (1 / 2) * (3 / 8) * (1 / 8))
    # a relevant item below an irrelevant one: (1/2) * R(2)
    assert err_at_k([0, 2], k=2, g_max=3) == pytest.approx(3 / 16)
    # three grade-1 items, g_max = 1: R = 1/2 each -> 1/2 + (1/2)(1/2)(1/2) + (1/3)(1/2)(1/4)
    assert err_at_k([1, 1, 1], k=3, g_max=1) == pytest.approx(1 / 2 + 1 / 8 + 1 / 24)
    assert err_at_k([1, 1, 1], k=2, g_max=1) == pytest.approx(1 / 2 + 1 / 8)
    # default g_max = 5
    assert err_at_k([5], k=1) == pytest.approx(31 / 32)
    assert err_at_k([4], k=1) == pytest.approx(15 / 32)


def test_err_edge_cases():
    assert err_at_k([], k=3) == 0.0
    assert err_at_k([0, 0], k=2) == 0.0
    with pytest.raises(ValueError, match="must not exceed g_max"):
        err_at_k([5], k=1, g_max=4)
    with pytest.raises(ValueError, match="g_max must be > 0"):
        err_at_k([0], k=1, g_max=0)


def test_single_target_err_values_and_list_form():
    got = target_err([1, 2, 4, 20, 21, INF], [5, 4, 3, 5, 5, 5], k=20)
    expected = [31 / 32, (15 / 32) / 2, (7 / 32) / 4, (31 / 32) / 20, 0.0, 0.0]
    np.testing.assert_allclose(got, expected)
    # the closed form equals ERR of a list holding only the target at its rank
    for rank, grade in [(1, 2), (7, 5), (10, 3)]:
        rel = np.zeros(12)
        rel[rank - 1] = grade
        assert target_err([rank], [grade], k=10)[0] == pytest.approx(err_at_k(rel, 10))
    # the per-query maximum convention: g_max = the target's own grade
    assert target_err([1], [4], k=10, g_max=4)[0] == pytest.approx(15 / 16)


def test_hit_rate():
    np.testing.assert_array_equal(target_hit([1, 10, 11, INF], k=10), [1.0, 1.0, 0.0, 0.0])
    assert hit_at_k([0, 0, 3], k=2) == 0.0
    assert hit_at_k([0, 0, 3], k=3) == 1.0
    assert hit_at_k([], k=3) == 0.0


def test_invalid_ranks_rejected():
    for bad in ([0], [1.5], [float("nan")], [-INF]):
        with pytest.raises(ValueError, match="ranks must"):
            target_hit(bad, k=10)
    with pytest.raises(ValueError, match="same length"):
        target_ndcg([1, 2], [5], k=10)


def test_target_ndcg_ideal_grade_makes_the_rating_count():
    from gcsl.metrics.ranking import target_ndcg

    # Ideal = the target itself: the grade cancels.
    assert target_ndcg([2, 2], [3, 5], k=10).tolist() == pytest.approx([1 / np.log2(3)] * 2)
    # Ideal = a grade-5 item at rank 1: (2^3 - 1)/log2(3) / 31 and (2^5 - 1)/log2(3) / 31.
    got = target_ndcg([2, 2, float("inf")], [3, 5, 5], k=10, ideal_grade=5)
    assert got.tolist() == pytest.approx([7 / np.log2(3) / 31, 1 / np.log2(3), 0.0])
