"""Which (row, goal) pairs a method trains on: pure index arithmetic over levels and scores.

Every function returns row indices (and goal levels) into the feedback table, so data stay in
Arrow and are gathered once with ``take``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Formulation",
    "retained_levels",
    "formulate_classic",
    "formulate_beyond",
    "formulate_sft",
    "formulate_all",
    "formulate_dpo_pairs",
    "formulate_sampled_pairs",
]


@dataclass(frozen=True)
class Formulation:
    """Rows to emit: ``rows[i]`` is a source row, ``goal_levels[i]`` its goal (0 = no goal)."""

    rows: np.ndarray
    goal_levels: np.ndarray
    dropped: dict[str, int]


def retained_levels(thresholds: tuple[float, ...], train_mean: float, *, filter_goals: bool = True) -> tuple[int, ...]:
    """H: the levels kept as training goals — those whose threshold is strictly above the mean.

    With filtering off every level is kept (the paper's ablation). If no threshold clears the
    mean (a heavily skewed log), the top level alone is kept so that a goal exists.

    >>> retained_levels((0.0, 0.2, 0.5, 0.8), 0.4)
    (3, 4)
    """
    levels = tuple(range(1, len(thresholds) + 1))
    if not filter_goals:
        return levels
    kept = tuple(k for k, t in zip(levels, thresholds) if t > train_mean)
    return kept or (levels[-1],)


def formulate_classic(levels: np.ndarray) -> Formulation:
    """Classic GCSL: every row once, its goal its own level."""
    rows = np.arange(len(levels), dtype=np.int64)
    return Formulation(rows, np.asarray(levels, dtype=np.int32), {})


def formulate_all(n: int) -> Formulation:
    """Every row once without a goal (no-quantization variants carry their raw score instead)."""
    return Formulation(np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int32), {})


def formulate_beyond(levels: np.ndarray, retained: tuple[int, ...]) -> Formulation:
    """GCSL-bey: row i is a demonstration of "r >= tau_k" for every retained k <= q_i.

    Output is ordered by row, then by goal level, so one row's goal variants are adjacent.

    >>> f = formulate_beyond(np.array([1, 3, 2]), (2, 3))
    >>> f.rows.tolist(), f.goal_levels.tolist(), f.dropped
    ([1, 1, 2], [2, 3, 2], {'below every retained goal': 1})
    """
    levels = np.asarray(levels, dtype=np.int32)
    kept = np.asarray(sorted(retained), dtype=np.int32)
    # Number of retained goals each row satisfies.
    counts = np.searchsorted(kept, levels, side="right")
    rows = np.repeat(np.arange(len(levels), dtype=np.int64), counts)
    # Within a row's block, goals run through kept[0], kept[1], ...
    offsets = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    goal_levels = kept[offsets] if len(rows) else np.zeros(0, dtype=np.int32)
    dropped = int((counts == 0).sum())
    return Formulation(rows, goal_levels.astype(np.int32), {"below every retained goal": dropped} if dropped else {})


def formulate_sft(oriented: np.ndarray, *, top_fraction: float = 0.25, cutoff: float | None = None) -> Formulation:
    """SFT positives: the top ``top_fraction`` of rows by score, or rows with score >= ``cutoff``.

    Ties at the top-p boundary are all kept (never split), so slightly more than p% may pass.

    >>> formulate_sft(np.array([0.1, 0.9, 0.5, 0.7]), top_fraction=0.5).rows.tolist()
    [1, 3]
    """
    oriented = np.asarray(oriented, dtype=np.float64)
    n = len(oriented)
    if cutoff is None:
        k = max(1, int(np.ceil(top_fraction * n)))
        cutoff = float(np.sort(oriented)[n - k])
        reason = f"outside the top {top_fraction:.0%}"
    else:
        reason = f"below the SFT cutoff {cutoff}"
    keep = oriented >= cutoff
    rows = np.flatnonzero(keep).astype(np.int64)
    dropped = int(n - len(rows))
    return Formulation(rows, np.zeros(len(rows), dtype=np.int32), {reason: dropped} if dropped else {})


def formulate_dpo_pairs(group: np.ndarray, oriented: np.ndarray, *, pairs_per_group: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt group, the ``pairs_per_group`` (chosen, rejected) pairs with the largest score gaps.

    Pairs with equal scores carry no preference and are skipped; ties in the gap are broken by
    row order, so the choice is deterministic.

    >>> c, r = formulate_dpo_pairs(np.array([0, 0, 0]), np.array([0.1, 0.9, 0.5]), pairs_per_group=2)
    >>> c.tolist(), r.tolist()
    ([1, 2], [0, 0])
    """
    group = np.asarray(group)
    oriented = np.asarray(oriented, dtype=np.float64)
    order = np.argsort(group, kind="stable")
    boundaries = np.flatnonzero(np.diff(group[order])) + 1
    chosen: list[int] = []
    rejected: list[int] = []
    for members in np.split(order, boundaries):
        if len(members) < 2:
            continue
        s = oriented[members]
        i, j = np.triu_indices(len(members), k=1)
        gap = np.abs(s[i] - s[j])
        useful = gap > 0
        i, j, gap = i[useful], j[useful], gap[useful]
        top = np.lexsort((j, i, -gap))[:pairs_per_group]
        for a, b in zip(i[top], j[top]):
            hi, lo = (a, b) if s[a] > s[b] else (b, a)
            chosen.append(int(members[hi]))
            rejected.append(int(members[lo]))
    return np.asarray(chosen, dtype=np.int64), np.asarray(rejected, dtype=np.int64)


def formulate_sampled_pairs(group: np.ndarray, positives: np.ndarray, *, negatives_per_positive: int = 1,
                            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """For one-response-per-prompt logs: pair each positive row with responses of *other* prompts.

    Sampled negatives are not known to be worse for this prompt (they were never rated for it);
    the output marks them so, and reports should say so.
    """
    group = np.asarray(group)
    rng = np.random.default_rng(seed)
    n = len(group)
    chosen: list[int] = []
    rejected: list[int] = []
    for row in np.asarray(positives, dtype=np.int64):
        picked = 0
        for _ in range(100 * negatives_per_positive):
            cand = int(rng.integers(n))
            if group[cand] != group[row]:
                chosen.append(int(row))
                rejected.append(cand)
                picked += 1
                if picked == negatives_per_positive:
                    break
    return np.asarray(chosen, dtype=np.int64), np.asarray(rejected, dtype=np.int64)
