"""Code-generation metrics: unbiased pass@k and Mercury's runtime-efficiency score Beyond@k.

Pure functions of counts and runtimes; running the code is :mod:`gcsl.tasks.code.harness`'s job.

- pass@k = 1 - C(n - c, k) / C(n, k) for n samples of which c pass (Chen et al., 2021);
- Beyond of one candidate with runtime r among passing reference runtimes R:
  lo = min R, hi = max R, beyond = (hi - clip(r, lo, hi)) / (hi - lo); a failing candidate
  scores 0 (Du et al., Mercury); the edge cases (no passing reference, hi == lo) are options;
- Beyond@k = mean of the first k samples' Beyond scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

__all__ = ["pass_at_k", "beyond_score", "beyond_at_k"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k, ``1 - C(n-c, k) / C(n, k)``, in the numerically stable product form.

    >>> round(pass_at_k(5, 2, 1), 6), round(pass_at_k(5, 2, 2), 6)
    (0.4, 0.7)
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def beyond_score(
    runtime: float | None,
    reference_runtimes: Sequence[float],
    *,
    no_reference: Literal["exclude", "pass"] = "exclude",
    equal_range: Literal["pass", "step", "exclude"] = "pass",
) -> float | None:
    """Beyond of one candidate: ``(hi - clip(r, lo, hi)) / (hi - lo)``; ``runtime=None`` means it failed.

    Returns None where the policy excludes the task (no passing reference with
    ``no_reference="exclude"``; ``hi == lo`` with ``equal_range="exclude"``).

    >>> beyond_score(2.0, [1.0, 3.0]), beyond_score(None, [1.0, 3.0]), beyond_score(0.5, [1.0, 3.0])
    (0.5, 0.0, 1.0)
    """
    if not reference_runtimes:
        if no_reference == "exclude":
            return None
        return 0.0 if runtime is None else 1.0
    lo, hi = min(reference_runtimes), max(reference_runtimes)
    if hi == lo:
        if equal_range == "exclude":
            return None
        if runtime is None:
            return 0.0
        return 1.0 if equal_range == "pass" or runtime <= hi else 0.0
    if runtime is None:
        return 0.0
    r = min(max(runtime, lo), hi)
    return (hi - r) / (hi - lo)


def beyond_at_k(scores: Sequence[float], k: int) -> float:
    """Mean of the first ``k`` samples' Beyond scores (samples in generation order).

    >>> beyond_at_k([1.0, 0.5, 0.0], 2)
    0.75
    """
    if not 1 <= k <= len(scores):
        raise ValueError(f"Beyond@{k} needs at least {k} samples, got {len(scores)}")
    return sum(scores[:k]) / k
