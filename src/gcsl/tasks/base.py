"""What every task evaluator returns, and the scorer interface text scorers share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["TaskResult", "TextScorer"]


@dataclass
class TaskResult:
    """The outcome of evaluating one generations file on one task.

    ``metrics`` holds the aggregate numbers (each metric's value is the mean of its per-unit
    values in ``unit_scores`` unless documented otherwise); ``unit_scores[metric][unit_id]`` is
    what paired statistics resample (prompts, tasks or users); ``items`` has one record per
    generation with its scores, a ``status`` and, when it could not be scored, a ``reason``.
    """

    task: str
    metrics: dict[str, float]
    unit_scores: dict[str, dict[str, float]]
    items: list[dict[str, Any]]
    n_units: int
    n_generations: int
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class TextScorer(Protocol):
    """Scores texts in [0, 1]; ``None`` for a text it could not score (never raises on bad text)."""

    name: str

    def score(self, texts: list[str]) -> list[float | None]: ...
