"""What a task is (:class:`Task`, :class:`MetricSpec`), what its evaluator returns, and the scorer
interface text scorers share.

A task is one package ``gcsl.tasks.<name>`` exporting one frozen :class:`Task` object ``TASK``:
its evaluate config and function, its data config and builder, and the metrics it emits with
their direction. Everything that needs to know about tasks (the CLI, the experiment report, the
config checks) reads these objects instead of keeping its own list.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = ["MetricSpec", "Task", "TaskResult", "TextScorer", "score_generations"]

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


@dataclass(frozen=True)
class MetricSpec:
    """One metric a task emits: its name, which way is better, and whether it is on the feedback's scale.

    ``name`` may hold ``{k}``, a positive cut-off chosen by an option (``ndcg@{k}`` matches
    ``ndcg@10``). ``on_feedback_scale`` is true when the metric is the mean of the training
    feedback's own score (same scorer, same direction, higher = better), so the paper's "beyond"
    check (does the top goal exceed the top training bin's mean?) applies to it.

    >>> MetricSpec("ndcg@{k}", True, False, "graded NDCG").matches("ndcg@10")
    True
    """

    name: str
    higher_is_better: bool
    on_feedback_scale: bool
    description: str

    def matches(self, metric: str) -> bool:
        pattern = re.escape(self.name).replace(re.escape("{k}"), "[1-9][0-9]*")
        return re.fullmatch(pattern, metric) is not None


@dataclass(frozen=True)
class Task:
    """An evaluation task: everything the CLI, experiments and reports need to know about it.

    - ``evaluate(rows, config, **kw) -> TaskResult`` scores generation rows under ``eval_config``
      (the options of ``gcsl evaluate <name>``);
    - ``write_data(config, out, overwrite) -> list[Path]`` writes the task's feedback log and/or
      prompt files into the folder ``out`` under ``data_config`` (the options of ``gcsl data <name>``);
    - ``metrics`` lists every metric ``evaluate`` can emit.

    >>> from gcsl.tasks import get_task
    >>> get_task("sentiment").metric("mean_score").on_feedback_scale
    True
    """

    name: str
    summary: str
    eval_config: type
    evaluate: Callable[..., TaskResult]
    data_config: type
    write_data: Callable[[Any, Path, bool], list[Path]]
    metrics: tuple[MetricSpec, ...]
    # Per-item fields of evaluate's items that an experiment's items/ copy keeps beside the ones every task
    # has (prompt_id, sample, completion, status, reason, score*): what a reader needs to re-score a row.
    item_fields: tuple[str, ...] = ()

    def metric(self, name: str) -> MetricSpec | None:
        """The spec ``name`` is an instance of (``ndcg@10`` -> ``ndcg@{k}``), or None if the task never emits it."""
        return next((m for m in self.metrics if m.matches(name)), None)

    @property
    def metric_names(self) -> list[str]:
        return [m.name for m in self.metrics]

    def build_data(self, out: Path, *, overwrite: bool = False, **options: Any) -> list[Path]:
        """Writes the task's data into ``out`` with ``options`` as fields of ``data_config``; returns the files.

        >>> get_task("sentiment").build_data(Path("data/sentiment"))  # doctest: +SKIP
        [PosixPath('data/sentiment/feedback.jsonl'), ...]
        """
        from gcsl.config import resolve_config

        return self.write_data(resolve_config(self.data_config, overrides=options), Path(out), overwrite)


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
