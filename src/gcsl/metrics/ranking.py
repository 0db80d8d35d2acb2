"""Graded ranking metrics: NDCG@k, ERR@k and hit rate (HR@k), as pure numpy functions.

Two views of the same formulas:

- list functions (:func:`dcg_at_k`, :func:`ndcg_at_k`, :func:`err_at_k`, :func:`hit_at_k`) take
  the relevance grades of one ranked list, best position first;
- single-target functions (:func:`target_ndcg`, :func:`target_err`, :func:`target_hit`) take, for
  many queries at once, the 1-based rank of the one relevant item (``inf`` when it was not found)
  and its grade. This is LLM recommendation: the user's next item is the only relevant one.

Definitions (grade g >= 0, positions i = 1, 2, ...):

- gain(g) = 2^g - 1, discount(i) = 1 / log2(i + 1);
- DCG@k = sum_{i<=k} gain(g_i) discount(i); NDCG@k = DCG@k / IDCG@k, IDCG@k being the DCG@k of
  the grades sorted best first (0 when IDCG@k is 0);
- ERR@k = sum_{r<=k} (1/r) R(g_r) prod_{i<r} (1 - R(g_i)) with R(g) = (2^g - 1) / 2^g_max.
  Implementations disagree on g_max (the scale's maximum or each query's maximum); it is a
  parameter here and defaults to 5, the top of a 1-5 star scale;
- HR@k = 1 when a relevant item (g > 0) is within the first k positions.

With one relevant item of grade g at rank r, single-target NDCG depends on the ideal list
(:func:`target_ndcg`'s ``ideal_grade``): with the target itself at rank 1 its gain cancels, so
NDCG@k = 1 / log2(r + 1) for any g > 0 (BIGRec, D3, SPRec); with an item of the scale's top grade
g_max at rank 1, NDCG@k = (2^g - 1) / (2^g_max - 1) / log2(r + 1), so, like ERR@k = R(g) / r, it
values higher ratings more (the paper's graded form, the recommendation task's default).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "DEFAULT_G_MAX",
    "gain",
    "discount",
    "dcg_at_k",
    "ndcg_at_k",
    "err_at_k",
    "hit_at_k",
    "target_ndcg",
    "target_err",
    "target_hit",
]

DEFAULT_G_MAX = 5.0

ArrayLike = Sequence[float] | np.ndarray


def _check_k(k: int) -> int:
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _grades(relevance: ArrayLike, g_max: float | None = None) -> np.ndarray:
    g = np.asarray(relevance, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(g)) or np.any(g < 0):
        raise ValueError("relevance grades must be finite and >= 0")
    if g_max is not None and np.any(g > g_max):
        raise ValueError(f"relevance grades must not exceed g_max={g_max}; raise g_max to the scale's maximum")
    return g


def gain(grades: ArrayLike) -> np.ndarray:
    """Exponential gain 2^g - 1 of each grade.

    >>> gain([0, 1, 3]).tolist()
    [0.0, 1.0, 7.0]
    """
    return np.exp2(np.asarray(grades, dtype=np.float64)) - 1.0


def discount(positions: ArrayLike) -> np.ndarray:
    """Position discount 1 / log2(i + 1) of 1-based positions (0 at an infinite position).

    >>> discount([1, 3]).tolist()
    [1.0, 0.5]
    """
    return 1.0 / np.log2(np.asarray(positions, dtype=np.float64) + 1.0)


def dcg_at_k(relevance: ArrayLike, k: int) -> float:
    """DCG@k of a ranked list of grades.

    >>> dcg_at_k([3, 0, 1], k=3)  # 7/1 + 0 + 1/2
    7.5
    """
    g = _grades(relevance)[: _check_k(k)]
    return float(np.sum(gain(g) * discount(np.arange(1, g.size + 1))))


def ndcg_at_k(relevance: ArrayLike, k: int, ideal_relevance: ArrayLike | None = None) -> float:
    """NDCG@k of a ranked list; the ideal list is ``ideal_relevance`` (default: ``relevance``) sorted.

    Pass ``ideal_relevance`` when relevant items may be missing from the ranked list, so the ideal
    still counts them. A list whose ideal DCG is 0 scores 0.

    >>> round(ndcg_at_k([0, 3], k=2), 4)  # (7 / log2 3) / 7
    0.6309
    """
    k = _check_k(k)
    ideal = _grades(relevance if ideal_relevance is None else ideal_relevance)
    idcg = dcg_at_k(np.sort(ideal)[::-1], k)
    if idcg == 0.0:
        return 0.0
    return dcg_at_k(relevance, k) / idcg


def _satisfaction(grades: np.ndarray, g_max: float) -> np.ndarray:
    """R(g) = (2^g - 1) / 2^g_max: the chance a user stops, satisfied, at an item of grade g."""
    if not g_max > 0:
        raise ValueError(f"g_max must be > 0, got {g_max!r}")
    return gain(grades) / np.exp2(g_max)


def err_at_k(relevance: ArrayLike, k: int, g_max: float = DEFAULT_G_MAX) -> float:
    """Expected reciprocal rank ERR@k of a ranked list of grades.

    >>> err_at_k([3, 2, 0], k=3, g_max=3)  # 7/8 + (1/2)(3/8)(1 - 7/8)
    0.8984375
    """
    g = _grades(relevance, g_max)[: _check_k(k)]
    r = _satisfaction(g, g_max)
    # Probability that the user reaches position i: everything above failed to satisfy.
    reach = np.concatenate(([1.0], np.cumprod(1.0 - r)[:-1]))
    return float(np.sum(reach * r / np.arange(1, g.size + 1)))


def hit_at_k(relevance: ArrayLike, k: int) -> float:
    """1.0 when an item with grade > 0 is among the first k positions, else 0.0.

    >>> hit_at_k([0, 0, 4], k=2), hit_at_k([0, 0, 4], k=3)
    (0.0, 1.0)
    """
    return float(np.any(_grades(relevance)[: _check_k(k)] > 0))


def _ranks(ranks: ArrayLike) -> np.ndarray:
    r = np.asarray(ranks, dtype=np.float64).reshape(-1)
    finite = np.isfinite(r)
    if np.any(np.isnan(r)) or np.any(r[finite] < 1) or np.any(r[finite] != np.floor(r[finite])):
        raise ValueError("ranks must be integers >= 1, or inf for a target that was not found")
    if np.any(r == -np.inf):
        raise ValueError("ranks must not be -inf")
    return r


def _target_inputs(ranks: ArrayLike, grades: ArrayLike, g_max: float | None) -> tuple[np.ndarray, np.ndarray]:
    r = _ranks(ranks)
    g = _grades(grades, g_max)
    if r.shape != g.shape:
        raise ValueError(f"ranks and grades must have the same length ({r.size} != {g.size})")
    return r, g


def target_ndcg(ranks: ArrayLike, grades: ArrayLike, k: int, ideal_grade: float | None = None) -> np.ndarray:
    """Per-query NDCG@k with one relevant item at ``ranks`` (inf: not found) of grade ``grades``.

    With ``ideal_grade=None`` the ideal list is the target itself at rank 1, so the grade cancels
    and NDCG = 1/log2(rank + 1) for any positive grade; with ``ideal_grade=g_max`` the ideal is a
    top-graded item at rank 1, so a low-rated target earns less (the rating counts). Implementations
    of graded single-target NDCG differ on this, so it is a choice, not a constant.

    >>> target_ndcg([1, 3, 11, float("inf")], [5, 4, 5, 5], k=10).round(4).tolist()
    [1.0, 0.5, 0.0, 0.0]
    >>> target_ndcg([1], [4], k=10, ideal_grade=5).round(4).tolist()  # 15/31
    [0.4839]
    """
    k = _check_k(k)
    r, g = _target_inputs(ranks, grades, None)
    hit = (r <= k) & (g > 0)
    out = np.zeros_like(r)
    ideal = g[hit] if ideal_grade is None else np.full(int(hit.sum()), float(ideal_grade))
    best = gain(ideal) * discount(np.ones(int(hit.sum())))
    out[hit] = gain(g[hit]) * discount(r[hit]) / best
    return out


def target_err(ranks: ArrayLike, grades: ArrayLike, k: int, g_max: float = DEFAULT_G_MAX) -> np.ndarray:
    """Per-query ERR@k with one relevant item: R(g) / rank within the top k, else 0.

    >>> target_err([1, 2, 30], [5, 5, 5], k=20).tolist()  # R(5) = 31/32
    [0.96875, 0.484375, 0.0]
    """
    k = _check_k(k)
    r, g = _target_inputs(ranks, grades, g_max)
    hit = r <= k
    out = np.zeros_like(r)
    # Nothing above the target is relevant, so the user reaches it with probability 1.
    out[hit] = _satisfaction(g[hit], g_max) / r[hit]
    return out


def target_hit(ranks: ArrayLike, k: int) -> np.ndarray:
    """Per-query HR@k: 1.0 when the target's rank is <= k.

    >>> target_hit([1, 10, 11, float("inf")], k=10).tolist()
    [1.0, 1.0, 0.0, 0.0]
    """
    k = _check_k(k)
    return (_ranks(ranks) <= k).astype(np.float64)
