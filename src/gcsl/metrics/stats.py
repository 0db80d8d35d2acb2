"""Statistics for comparing runs: bootstrap intervals, paired bootstrap over units, paired t-test over seeds.

Every result carries n, the means and an interval, so a number is never reported bare. All
resampling uses ``numpy.random.default_rng(seed)``: the same inputs and seed give the same result.

- :func:`mean_ci`: percentile bootstrap interval of a mean.
- :func:`difference_ci`: mean(A) - mean(B) for two independent groups (each resampled on its own).
- :func:`paired_bootstrap`: two systems scored on the same units (prompts, tasks, users); the
  shared units are resampled jointly, so each resample keeps every unit's pair together.
- :func:`paired_ttest`: per-seed aggregates of two methods, paired by seed (scipy's ``ttest_rel``).
- :func:`holm_adjust`: p-values of a family of tests (every variant against one baseline) adjusted so that
  the chance of any false "difference" in the family stays at the level (Holm's step-down method).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gcsl.errors import MissingDependencyError

__all__ = [
    "MeanInterval",
    "PairedComparison",
    "PairedTTest",
    "difference_ci",
    "holm_adjust",
    "mean_ci",
    "paired_bootstrap",
    "paired_ttest",
]

# Resamples drawn per block; bounds memory at _BLOCK * n indices whatever n_boot is.
_BLOCK = 1000


class _Record:
    """A result dataclass that serialises to a plain dict (for metrics JSON and reports)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MeanInterval(_Record):
    """A mean with its bootstrap interval [low, high]."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float
    n_boot: int
    seed: int
    note: str | None = None


@dataclass(frozen=True)
class PairedComparison(_Record):
    """System A minus system B over shared units: ``diff = mean_a - mean_b`` with its interval.

    ``p_value`` is two-sided for "no difference"; ``only_a``/``only_b`` count units that only one
    system has (left out of the comparison, never silently).
    """

    mean_a: float
    mean_b: float
    diff: float
    low: float
    high: float
    p_value: float
    n: int
    only_a: int
    only_b: int
    confidence: float
    n_boot: int
    seed: int
    note: str | None = None


@dataclass(frozen=True)
class PairedTTest(_Record):
    """Paired t-test over seeds: ``mean_diff = mean(a - b)``; NaN t and p with a note when undefined."""

    t: float
    p_value: float
    n: int
    mean_diff: float
    note: str | None = None


def _values(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{what}: every value must be finite (found NaN or inf)")
    return v


def _check_settings(confidence: float, n_boot: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence!r}")
    if isinstance(n_boot, bool) or int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")


def _bootstrap_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement, same size) of ``values``."""
    n = values.size
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, _BLOCK):
        stop = min(start + _BLOCK, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = values[idx].mean(axis=1)
    return out


def _percentile_interval(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95, n_boot: int = 10_000,
            seed: int = 0) -> MeanInterval:
    """Mean of ``values`` with a percentile bootstrap interval.

    An empty input gives NaN with a note; one value gives the degenerate interval [v, v].

    >>> r = mean_ci([2.0, 2.0, 2.0], seed=0)
    >>> (r.mean, r.low, r.high, r.n)
    (2.0, 2.0, 2.0, 3)
    """
    _check_settings(confidence, n_boot)
    v = _values(values, "mean_ci")
    if v.size == 0:
        nan = math.nan
        return MeanInterval(nan, nan, nan, 0, confidence, int(n_boot), seed, note="no values")
    boot = _bootstrap_means(v, int(n_boot), np.random.default_rng(seed))
    low, high = _percentile_interval(boot, confidence)
    note = "a single value: the interval is degenerate" if v.size == 1 else None
    return MeanInterval(float(v.mean()), low, high, int(v.size), confidence, int(n_boot), seed, note)


def difference_ci(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, confidence: float = 0.95,
                  n_boot: int = 10_000, seed: int = 0) -> MeanInterval:
    """mean(a) - mean(b) for two independent groups, with a percentile bootstrap interval.

    Each group is resampled on its own (the groups share no units, unlike :func:`paired_bootstrap`);
    ``mean`` is the observed difference and ``n`` the two groups' sizes together. An empty group
    gives NaN with a note.

    >>> r = difference_ci([3.0, 3.0], [1.0, 1.0, 1.0], n_boot=100)
    >>> (r.mean, r.low, r.high, r.n)
    (2.0, 2.0, 2.0, 5)
    """
    _check_settings(confidence, n_boot)
    va, vb = _values(a, "difference_ci A"), _values(b, "difference_ci B")
    if va.size == 0 or vb.size == 0:
        nan = math.nan
        return MeanInterval(nan, nan, nan, int(va.size + vb.size), confidence, int(n_boot), seed,
                            note="a group has no values")
    rng = np.random.default_rng(seed)
    boot = _bootstrap_means(va, int(n_boot), rng) - _bootstrap_means(vb, int(n_boot), rng)
    low, high = _percentile_interval(boot, confidence)
    note = "a group has a single value: its share of the interval is degenerate" if min(va.size, vb.size) == 1 \
        else None
    return MeanInterval(float(va.mean() - vb.mean()), low, high, int(va.size + vb.size), confidence, int(n_boot),
                        seed, note)


def paired_bootstrap(a_by_unit: Mapping[Hashable, float], b_by_unit: Mapping[Hashable, float],
                     confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> PairedComparison:
    """Paired bootstrap of mean(A) - mean(B) over the units both systems scored.

    Units are resampled jointly (one draw picks a unit's A and B scores together), in sorted unit
    order so the result does not depend on dict order. The interval is the percentile interval of
    the resampled differences. The two-sided p-value tests "no difference" by centring the
    resampled differences on 0: p = (1 + #{|d* - d| >= |d|}) / (n_boot + 1), d the observed
    difference (so p = 1 when A and B agree on every unit).

    >>> r = paired_bootstrap({"p1": 1.0, "p2": 0.5}, {"p1": 0.0, "p2": -0.5}, n_boot=200)
    >>> (r.diff, r.low, r.high, r.n, r.p_value < 0.01)
    (1.0, 1.0, 1.0, 2, True)
    """
    _check_settings(confidence, n_boot)
    shared = sorted(set(a_by_unit) & set(b_by_unit), key=lambda u: (type(u).__name__, str(u)))
    only_a = len(set(a_by_unit) - set(b_by_unit))
    only_b = len(set(b_by_unit) - set(a_by_unit))
    notes = []
    if only_a or only_b:
        notes.append(f"{only_a} unit(s) only in A and {only_b} only in B were left out")
    a = _values([a_by_unit[u] for u in shared], "paired_bootstrap A")
    b = _values([b_by_unit[u] for u in shared], "paired_bootstrap B")
    if not shared:
        nan = math.nan
        notes.append("no shared units")
        return PairedComparison(nan, nan, nan, nan, nan, nan, 0, only_a, only_b, confidence, int(n_boot), seed,
                                "; ".join(notes))
    d = a - b
    observed = float(d.mean())
    boot = _bootstrap_means(d, int(n_boot), np.random.default_rng(seed))
    low, high = _percentile_interval(boot, confidence)
    extreme = int(np.count_nonzero(np.abs(boot - observed) >= abs(observed)))
    p_value = (1.0 + extreme) / (int(n_boot) + 1.0)
    if d.size == 1:
        notes.append("a single shared unit: the interval is degenerate")
    return PairedComparison(float(a.mean()), float(b.mean()), observed, low, high, p_value, int(d.size), only_a,
                            only_b, confidence, int(n_boot), seed, "; ".join(notes) or None)


def _paired_seed_values(a_seeds: Sequence[float] | Mapping[Hashable, float],
                        b_seeds: Sequence[float] | Mapping[Hashable, float]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(a_seeds, Mapping) != isinstance(b_seeds, Mapping):
        raise ValueError("paired_ttest: give both inputs as sequences (paired by position) or both as mappings "
                         "(paired by seed)")
    if isinstance(a_seeds, Mapping):
        if set(a_seeds) != set(b_seeds):
            raise ValueError(f"paired_ttest: the two runs have different seeds ({sorted(map(str, a_seeds))} vs "
                             f"{sorted(map(str, b_seeds))}); compare runs over the same seeds")
        keys = sorted(a_seeds, key=str)
        return (_values([a_seeds[s] for s in keys], "paired_ttest A"),
                _values([b_seeds[s] for s in keys], "paired_ttest B"))
    a, b = _values(a_seeds, "paired_ttest A"), _values(b_seeds, "paired_ttest B")
    if a.size != b.size:
        raise ValueError(f"paired_ttest: one value per seed for each run is needed ({a.size} != {b.size})")
    return a, b


def paired_ttest(a_seeds: Sequence[float] | Mapping[Hashable, float],
                 b_seeds: Sequence[float] | Mapping[Hashable, float]) -> PairedTTest:
    """Paired t-test of A against B over seeds (``scipy.stats.ttest_rel``, two-sided).

    Inputs are per-seed values, as sequences paired by position or mappings paired by seed.
    With fewer than 2 pairs, or differences with zero variance, t and p are NaN and ``note`` says why.

    >>> r = paired_ttest([1.0, 2.0, 3.0], [0.0, 0.0, 1.0])  # differences 1, 2, 2
    >>> (round(r.t, 6), round(r.p_value, 4), r.n)
    (5.0, 0.0377, 3)
    """
    a, b = _paired_seed_values(a_seeds, b_seeds)
    d = a - b
    n = int(d.size)
    mean_diff = float(d.mean()) if n else math.nan
    if n < 2:
        return PairedTTest(math.nan, math.nan, n, mean_diff, note=f"a paired t-test needs at least 2 seeds, got {n}")
    if np.ptp(d) == 0.0:
        return PairedTTest(math.nan, math.nan, n, mean_diff,
                           note=f"every seed differs by exactly {mean_diff:g}: zero variance, t is undefined")
    try:
        from scipy import stats
    except ImportError:
        raise MissingDependencyError.for_package("scipy", "the paired t-test", "pip install 'gcsl[eval]'") from None
    res = stats.ttest_rel(a, b)
    return PairedTTest(float(res.statistic), float(res.pvalue), n, mean_diff)


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values, in their order.

    With m tests sorted by p, the k-th smallest (k from 0) becomes max over j <= k of min(1, (m - j) p_(j)): a test
    counts as a difference at level a when its adjusted p is below a, and the chance of any false one in the family
    is then at most a. NaN p-values (a test that could not run) stay NaN and are not counted in m.

    >>> holm_adjust([0.01, 0.04, 0.03, float("nan")])
    [0.03, 0.06, 0.06, nan]
    """
    values = [float(p) for p in p_values]
    ranked = sorted((p, i) for i, p in enumerate(values) if not math.isnan(p))
    out = [math.nan] * len(values)
    running = 0.0
    for k, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - k) * p))
        out[i] = running
    return out
