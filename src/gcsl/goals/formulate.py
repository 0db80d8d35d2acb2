"""Which (row, goal) pairs a method trains on: pure index arithmetic over levels and scores.

Every function returns row indices (and goal levels) into the feedback table, so data stay in
Arrow and are gathered once with ``take``.

Two layers. The primitives (``formulate_sft``, ``formulate_beyond`` ...) take plain arrays and
options. The formulations (``top_fraction``, ``bottom_fraction``, ``per_level``, ``beyond_threshold``, ``unquantized``,
``preference_pairs``) all take one :class:`FormulationInput` and are what the method table
(:mod:`gcsl.methods`) names, so ``gcsl prepare`` calls a method's formulation without knowing
which method it is. A new method that needs a new row selection adds one formulation here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "Formulation",
    "FormulationInput",
    "Pairs",
    "top_fraction",
    "bottom_fraction",
    "per_level",
    "beyond_threshold",
    "unquantized",
    "preference_pairs",
    "bigrec_positives",
    "BIGREC_POSITIVE_ABOVE",
    "retained_levels",
    "formulate_classic",
    "formulate_beyond",
    "formulate_sft",
    "formulate_sft_bottom",
    "formulate_all",
    "formulate_dpo_pairs",
    "formulate_sampled_pairs",
    "combination_ids",
    "combination_levels",
    "formulate_classic_aspects",
    "formulate_beyond_aspects",
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


# -- several aspects: a goal is a tuple of per-aspect levels, numbered as one combination id ----
# Ids are mixed-radix over every aspect's levels (the last aspect varies fastest), 1-based so that
# 0 still means "no goal": the output keeps one integer goal per row, like a single aspect's level.

def combination_ids(levels: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """Ids of per-aspect level tuples (rows of ``levels``, each level in 1..sizes[a]).

    >>> combination_ids(np.array([[1, 1], [1, 3], [2, 1]]), (2, 3)).tolist()
    [1, 3, 4]
    """
    levels = np.asarray(levels, dtype=np.int64).reshape(-1, len(sizes))
    strides = np.cumprod((1,) + tuple(sizes[:0:-1]))[::-1]
    return ((levels - 1) @ strides + 1).astype(np.int32)


def combination_levels(combination: int, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The per-aspect levels of a combination id (the inverse of :func:`combination_ids`).

    >>> combination_levels(4, (2, 3))
    (2, 1)
    """
    return tuple(int(i) + 1 for i in np.unravel_index(combination - 1, sizes))


def formulate_classic_aspects(levels: np.ndarray, sizes: tuple[int, ...]) -> Formulation:
    """Classic GCSL over several aspects: every row once, its goal the tuple of its own levels."""
    return Formulation(np.arange(len(levels), dtype=np.int64), combination_ids(levels, sizes), {})


def formulate_beyond_aspects(levels: np.ndarray, retained: tuple[tuple[int, ...], ...],
                             sizes: tuple[int, ...]) -> Formulation:
    """GCSL-bey over several aspects: row i demonstrates every combination of retained thresholds it
    reaches in *every* aspect (aspect a's level k with k <= q_ia and k in H_a).

    Output is ordered by row, then by combination id, as the single-aspect expansion is.

    >>> f = formulate_beyond_aspects(np.array([[3, 2], [3, 1], [2, 2]]), ((2, 3), (2,)), (3, 2))
    >>> f.rows.tolist(), [combination_levels(c, (3, 2)) for c in f.goal_levels], f.dropped
    ([0, 0, 2], [(2, 2), (3, 2), (2, 2)], {'below every retained goal': 1})
    """
    levels = np.asarray(levels, dtype=np.int32)
    grids = np.meshgrid(*[np.asarray(sorted(h), dtype=np.int32) for h in retained], indexing="ij")
    combos = np.stack([g.ravel() for g in grids], axis=1)  # lexicographic, so ids come out ascending
    # reached[i, c]: row i is at or above combination c in every aspect.
    reached = (levels[:, None, :] >= combos[None, :, :]).all(axis=2)
    rows, which = np.nonzero(reached)  # row-major: by row, then by combination
    dropped = int((~reached.any(axis=1)).sum())
    return Formulation(rows.astype(np.int64), combination_ids(combos[which], sizes),
                       {"below every retained goal": dropped} if dropped else {})


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


def formulate_sft_bottom(oriented: np.ndarray, *, fraction: float = 0.25, cutoff: float | None = None) -> Formulation:
    """The mirror of :func:`formulate_sft`: the bottom ``fraction`` of rows by score, or rows with score < ``cutoff``.

    Ties at the boundary are all kept, as at the top. With a cutoff the rows are exactly those
    :func:`formulate_sft` drops, so an expert and an anti-expert (DExperts) split the log between them.

    >>> formulate_sft_bottom(np.array([0.1, 0.9, 0.5, 0.7]), fraction=0.5).rows.tolist()
    [0, 2]
    """
    oriented = np.asarray(oriented, dtype=np.float64)
    n = len(oriented)
    if cutoff is None:
        k = max(1, int(np.ceil(fraction * n)))
        keep = oriented <= float(np.sort(oriented)[k - 1])
        reason = f"outside the bottom {fraction:.0%}"
    else:
        keep = oriented < cutoff
        reason = f"at or above the SFT cutoff {cutoff}"
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


# -- formulations: the uniform signature the method table refers to ---------------------------

@dataclass(frozen=True)
class FormulationInput:
    """Everything a formulation may read: per-row levels, scores and prompt groups, and the options.

    ``oriented`` scores are higher-is-better; ``sft_cutoff`` is in the same oriented units.
    """

    levels: np.ndarray
    oriented: np.ndarray
    groups: np.ndarray
    retained: tuple[int, ...]
    sft_top: float = 0.25
    sft_cutoff: float | None = None
    pairs_per_group: int = 5
    negatives: Literal["observed", "sampled"] = "observed"
    seed: int = 0


@dataclass(frozen=True)
class Pairs:
    """Preference pairs: ``chosen[i]`` beats ``rejected[i]`` (row indices into the feedback table).

    ``pair_type`` is ``observed`` (both rated for the same prompt) or ``sampled-negative`` (the
    rejected response answered another prompt, so its score says nothing about this one).
    """

    chosen: np.ndarray
    rejected: np.ndarray
    pair_type: str
    dropped: dict[str, int]


def top_fraction(data: FormulationInput) -> Formulation:
    """SFT: the best-rated rows (``sft_top`` of them, or those at or above ``sft_cutoff``), no goal."""
    return formulate_sft(data.oriented, top_fraction=data.sft_top, cutoff=data.sft_cutoff)


def bottom_fraction(data: FormulationInput) -> Formulation:
    """SFT on the worst-rated rows (DExperts' anti-expert): the bottom ``sft_top`` of them, or those
    below ``sft_cutoff``, no goal.

    >>> bottom_fraction(FormulationInput(np.zeros(4), np.array([0.1, 0.9, 0.5, 0.7]), np.zeros(4), (),
    ...                                  sft_top=0.5)).rows.tolist()
    [0, 2]
    """
    return formulate_sft_bottom(data.oriented, fraction=data.sft_top, cutoff=data.sft_cutoff)


def per_level(data: FormulationInput) -> Formulation:
    """Classic GCSL: every row once, its goal its own level."""
    return formulate_classic(data.levels)


def beyond_threshold(data: FormulationInput) -> Formulation:
    """GCSL-bey: every row once per retained threshold it reaches.

    >>> f = beyond_threshold(FormulationInput(np.array([1, 3, 2]), np.zeros(3), np.zeros(3), (2, 3)))
    >>> f.rows.tolist(), f.goal_levels.tolist()
    ([1, 1, 2], [2, 3, 2])
    """
    return formulate_beyond(data.levels, data.retained)


def unquantized(data: FormulationInput) -> Formulation:
    """No quantization: every row once; its goal is its own raw score, not a level."""
    return formulate_all(len(data.levels))


# BIGRec's positive label: rating > 3 on the 1-5 scale (SAI990323/BIGRec data/movie/process.ipynb).
BIGREC_POSITIVE_ABOVE = 3.0


def bigrec_positives(data: FormulationInput) -> Formulation:
    """BIGRec's training rows: the interactions rated above 3 (oriented scores, 1-5 ratings), no goal.

    >>> f = bigrec_positives(FormulationInput(np.zeros(4), np.array([5.0, 3.0, 4.0, 1.0]), np.zeros(4), ()))
    >>> f.rows.tolist(), f.dropped
    ([0, 2], {'rated 3 or below (BIGRec keeps ratings > 3)': 2})
    """
    oriented = np.asarray(data.oriented, dtype=np.float64)
    rows = np.flatnonzero(oriented > BIGREC_POSITIVE_ABOVE).astype(np.int64)
    dropped = int(len(oriented) - len(rows))
    reason = f"rated {BIGREC_POSITIVE_ABOVE:g} or below (BIGRec keeps ratings > {BIGREC_POSITIVE_ABOVE:g})"
    return Formulation(rows, np.zeros(len(rows), dtype=np.int32), {reason: dropped} if dropped else {})


def preference_pairs(data: FormulationInput) -> Pairs:
    """DPO/SimPO pairs: observed pairs of one prompt's responses, or top rows against other prompts' ones.

    An empty ``observed`` result means no prompt has two differently rated responses; the caller
    names the input and the fix (``--dpo-negatives sampled``).
    """
    if data.negatives == "observed":
        chosen, rejected = formulate_dpo_pairs(data.groups, data.oriented, pairs_per_group=data.pairs_per_group)
        pair_type = "observed"
    else:
        positives = formulate_sft(data.oriented, top_fraction=data.sft_top).rows
        chosen, rejected = formulate_sampled_pairs(data.groups, positives, seed=data.seed)
        pair_type = "sampled-negative"
    unpaired = int(len(data.oriented) - len(np.union1d(chosen, rejected)))
    return Pairs(chosen, rejected, pair_type, {"not in any pair": unpaired} if unpaired else {})
