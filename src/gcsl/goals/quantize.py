"""Equal-frequency quantization of feedback into goal levels (pure numpy, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gcsl.goals.spec import MetricSpec

__all__ = ["Quantization", "quantize_feedback", "assign_levels"]


@dataclass(frozen=True)
class Quantization:
    """Thresholds tau_1 < ... < tau_K (oriented units) and each row's level in 1..K."""

    thresholds: tuple[float, ...]
    levels: np.ndarray
    bins_requested: int
    notes: tuple[str, ...] = field(default=())

    @property
    def bins_used(self) -> int:
        return len(self.thresholds)


def assign_levels(oriented: np.ndarray, thresholds: tuple[float, ...] | np.ndarray) -> np.ndarray:
    """Level of each score: the largest k with tau_k <= score (1-based).

    A score is a function of its value only, so equal scores can never land in different bins.

    >>> assign_levels(np.array([0.1, 0.5, 0.9]), (0.1, 0.5)).tolist()
    [1, 2, 2]
    """
    return np.searchsorted(np.asarray(thresholds, dtype=np.float64), oriented, side="right").astype(np.int32)


def quantize_feedback(oriented: np.ndarray, spec: MetricSpec, bins: int = 5) -> Quantization:
    """Splits oriented scores into ``bins`` equal-frequency bins; tau_k is bin k's smallest score.

    For N distinct scores with N a multiple of K every bin holds N/K rows. Ties move a
    boundary up to the tie group's value, so a tie group is never split; boundaries that
    collapse onto each other merge and fewer bins are used (reported in ``notes``).
    Ordinal and categorical feedback keep their own levels: ratings 1..5 give tau_k = k.

    >>> q = quantize_feedback(np.arange(10.0), MetricSpec(), bins=5)
    >>> q.thresholds, np.bincount(q.levels).tolist()
    ((0.0, 2.0, 4.0, 6.0, 8.0), [0, 2, 2, 2, 2, 2])
    """
    oriented = np.asarray(oriented, dtype=np.float64)
    notes: list[str] = []
    if spec.kind in ("ordinal", "categorical"):
        thresholds = _scale_levels(spec, oriented)
        return Quantization(thresholds, assign_levels(oriented, thresholds), len(thresholds), ())
    ordered = np.sort(oriented, kind="stable")
    n = len(ordered)
    # Bin k (0-based) starts at sorted position floor(k*N/K): bins differ in size by at most one.
    starts = [(k * n) // bins for k in range(bins)]
    candidates = [float(ordered[s]) for s in starts]
    thresholds = tuple(sorted(set(candidates)))
    if len(thresholds) < bins:
        notes.append(
            f"ties in the scores collapse {bins} requested bins into {len(thresholds)}; "
            f"goals use {len(thresholds)} levels"
        )
    return Quantization(thresholds, assign_levels(oriented, thresholds), bins, tuple(notes))


def _scale_levels(spec: MetricSpec, oriented: np.ndarray) -> tuple[float, ...]:
    if spec.kind == "categorical":
        return tuple(float(k) for k in range(1, len(spec.categories) + 1))
    low, high = spec.low, spec.high
    if low is None or high is None:
        low, high = float(np.min(oriented)), float(np.max(oriented))
    lo, hi = sorted((spec.orient(np.array([low]))[0], spec.orient(np.array([high]))[0]))
    return tuple(float(v) for v in np.arange(np.ceil(lo), np.floor(hi) + 1))
