"""What every task evaluator returns, and the scorer interface text scorers share."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["TaskResult", "TextScorer", "score_generations"]

log = logging.getLogger(__name__)
_SCORE_CHUNK = 256  # texts per scorer call: a progress line per chunk for slow (network) scorers


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


def score_generations(rows: Sequence[dict[str, Any]], scorer: TextScorer, *, key: str = "score"
                      ) -> list[dict[str, Any]]:
    """One item per generation row: ``key`` holds its score or ``None`` (status ``unscorable`` and the reason).

    Non-text and empty completions never reach the scorer; a text the scorer cannot score keeps
    the scorer's own reason. Nothing here raises because of what a model wrote.

    >>> class Length:
    ...     name, last_reasons = "length", None
    ...     def score(self, texts): return [min(len(t) / 10, 1.0) for t in texts]
    >>> [(i["score"], i["status"]) for i in score_generations(
    ...     [{"prompt_id": 1, "completion": "abcde"}, {"prompt_id": 2, "completion": " "}], Length())]
    [(0.5, 'scored'), (None, 'unscorable')]
    """
    items = []
    pending = []
    for i, row in enumerate(rows):
        completion = row.get("completion")
        item = {"prompt_id": str(row["prompt_id"]), "sample": row.get("sample"), "completion": completion,
                key: None, "status": "scored", "reason": None}
        if not isinstance(completion, str):
            item.update(status="unscorable", reason=f"completion is not text ({type(completion).__name__})")
        elif not completion.strip():
            item.update(status="unscorable", reason="empty completion")
        else:
            pending.append(i)
        items.append(item)
    for start in range(0, len(pending), _SCORE_CHUNK):
        chunk = pending[start:start + _SCORE_CHUNK]
        scores = scorer.score([rows[i]["completion"] for i in chunk])
        reasons = getattr(scorer, "last_reasons", None) or [None] * len(chunk)
        for i, s, why in zip(chunk, scores, reasons):
            if s is None:
                items[i].update(status="unscorable", reason=why or "the scorer gave no score")
            else:
                items[i][key] = float(s)
        log.info("scored %d of %d generations with %s", start + len(chunk), len(pending), scorer.name)
    return items
