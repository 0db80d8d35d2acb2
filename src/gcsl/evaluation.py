"""The evaluate workflow: score a generations file on one task and write metrics with intervals.

Read top to bottom, :func:`evaluate`

1. reads the generations JSONL (``gcsl generate --out``), checking every line;
2. builds the task's config from ``task_options`` and calls its ``evaluate`` (the task comes from
   the one registry, :data:`gcsl.tasks.TASKS`);
3. puts a percentile bootstrap interval on every metric from its per-unit scores (prompts,
   tasks or users are the units);
4. writes ``<out stem>.items.jsonl`` (one record per generation), ``<out stem>.run.json`` (the
   run record) and, last, ``<out>`` itself (METRICS.json), each atomically, so an existing
   METRICS.json always belongs to a finished run.

Items are kept as they are produced: a task whose ``evaluate`` takes ``on_item`` hands over each
finished item, which is appended (and flushed) to ``<out stem>.items.jsonl.partial``; when the
task is done, ``.items.jsonl`` is written (atomically, in input order) and the journal removed.
For other tasks the items are appended there one by one and the file is renamed at the end. A
run that dies late leaves its finished items in the ``.partial`` file, never in a
complete-looking one. Text that cannot be encoded as UTF-8 (a lone surrogate from a model or from a candidate's
exception message) is written backslash-escaped (``\\udcff``), never a crash.

Tasks are imported by name only when used, so evaluating sentiment never imports the code
sandbox or sentence-transformers.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gcsl.config import config_to_dict, field, resolve_config
from gcsl.errors import StageError
from gcsl.metrics.stats import mean_ci
from gcsl.runinfo import atomic_write_json, package_versions, write_run_record
from gcsl.stages import iter_jsonl, json_line, json_safe, read_generations, text_safe, write_jsonl
from gcsl.tasks import TASKS, get_task
from gcsl.tasks.base import Task, TaskResult

__all__ = [
    "TASKS",
    "EvaluateConfig",
    "evaluate",
    "task_config_class",
    "read_generations",
    "iter_jsonl",
    "write_jsonl",
    "output_paths",
]


@dataclass
class EvaluateConfig:
    """What ``gcsl evaluate`` needs; task-specific options live in ``task_options``."""

    task: str = field(help="task whose evaluator scores the generations (a name in gcsl.tasks.TASKS)", cli=False)
    generations: Path = field(help="generations JSONL written by `gcsl generate`")
    out: Path = field(help="METRICS.json to write; <stem>.items.jsonl and <stem>.run.json go beside it")
    task_options: dict[str, Any] = field(
        default_factory=dict, cli=False,
        help="options of the task's evaluator (YAML mapping; on the command line give them as --option value)")
    ci_confidence: float = field(0.95, help="confidence level of the bootstrap intervals")
    ci_samples: int = field(10_000, help="bootstrap resamples per interval")
    ci_seed: int = field(0, help="seed of the bootstrap resampling")
    overwrite: bool = field(False, help="replace an existing --out file")

    def validate(self) -> list[str]:
        problems = []
        if self.task not in TASKS:
            problems.append(f"task: {self.task!r} is not one of {', '.join(TASKS)}")
        if not 0.0 < self.ci_confidence < 1.0:
            problems.append(f"ci_confidence: must be between 0 and 1, got {self.ci_confidence}")
        if self.ci_samples < 1:
            problems.append(f"ci_samples: must be >= 1, got {self.ci_samples}")
        if Path(self.out).resolve() == Path(self.generations).resolve():
            problems.append("out: must differ from --generations (it would overwrite the generations)")
        return problems


def task_config_class(task: str) -> tuple[Task, type]:
    """The task and its evaluate config class: an alias of :func:`gcsl.tasks.get_task` kept for its callers.

    >>> task_config_class("sentiment")[1].__name__
    'SentimentEvalConfig'
    """
    found = get_task(task)
    return found, found.eval_config


def output_paths(out: Path) -> tuple[Path, Path]:
    """The per-item scores and run-record paths that go beside ``out`` (``<stem>.items.jsonl``, ``<stem>.run.json``).

    >>> [p.name for p in output_paths(Path("runs/METRICS.json"))]
    ['METRICS.items.jsonl', 'METRICS.run.json']
    """
    out = Path(out)
    return out.with_name(out.stem + ".items.jsonl"), out.with_name(out.stem + ".run.json")


def _intervals(result: TaskResult, cfg: EvaluateConfig) -> tuple[dict[str, Any], list[str]]:
    intervals: dict[str, Any] = {}
    notes = []
    for metric in result.metrics:
        per_unit = result.unit_scores.get(metric)
        if per_unit is None:
            notes.append(f"{metric}: no per-unit scores, so no interval")
            continue
        values = [float(v) for v in per_unit.values() if v is not None and math.isfinite(float(v))]
        if len(values) < len(per_unit):
            notes.append(f"{metric}: {len(per_unit) - len(values)} non-finite per-unit value(s) left out of its interval")
        intervals[metric] = mean_ci(values, confidence=cfg.ci_confidence, n_boot=cfg.ci_samples,
                                    seed=cfg.ci_seed).to_dict()
    return intervals, notes


def evaluate(cfg: EvaluateConfig) -> TaskResult:
    """Scores ``cfg.generations`` on ``cfg.task`` and writes METRICS.json, items and run record.

    >>> cfg = EvaluateConfig(task="sentiment", generations=Path("gens.jsonl"), out=Path("METRICS.json"))
    >>> evaluate(cfg).metrics["mean_score"]  # doctest: +SKIP
    0.71
    """
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise StageError(f"{out}: already exists; pass --overwrite or choose another --out")
    rows = read_generations(cfg.generations)
    task = get_task(cfg.task)
    task_cfg = resolve_config(task.eval_config, overrides=dict(cfg.task_options))
    items_path, run_path = output_paths(out)
    partial = items_path.with_name(items_path.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)

    journal = partial.open("w", encoding="utf-8")
    try:
        def keep(item: dict[str, Any]) -> None:
            journal.write(json_line(item))
            journal.flush()

        streams = "on_item" in inspect.signature(task.evaluate).parameters
        result: TaskResult = task.evaluate(rows, task_cfg, **({"on_item": keep} if streams else {}))
        if streams:
            # The journal holds the items in completion order; the final file has them in input order.
            journal.close()
            write_jsonl(items_path, result.items)
            partial.unlink()
        else:
            for item in result.items:
                keep(item)
            os.fsync(journal.fileno())
            journal.close()
            os.replace(partial, items_path)  # only a complete file gets the final name
    except BaseException:
        journal.close()
        if partial.exists() and partial.stat().st_size == 0:
            partial.unlink()  # nothing finished (e.g. a bad option): leave nothing behind
        raise

    intervals, ci_notes = _intervals(result, cfg)
    goal_requests = sorted({text_safe(str(r.get("goal_request"))) for r in rows if r.get("goal_request") is not None})
    goals = sorted({text_safe(r["goal"]) for r in rows if isinstance(r.get("goal"), str)})
    # one record per METRICS file: several evaluations may share a directory, so not run.json
    write_run_record(run_path.parent, stage="evaluate", config=cfg, seed=cfg.ci_seed,
                     goals={"goal_requests": goal_requests, "goals": goals},
                     extra={"task_config": json_safe(config_to_dict(task_cfg)),
                            "task_options_in_force": json_safe(result.options)}, filename=run_path.name)
    atomic_write_json(out, json_safe({
        "task": result.task,
        "generations": str(cfg.generations),
        "metrics": result.metrics,
        "ci": intervals,
        "n_units": result.n_units,
        "n_generations": result.n_generations,
        "options": result.options,
        "notes": [*result.notes, *ci_notes],
        "versions": package_versions(),
        # Per-unit values behind each metric: what paired comparisons across runs resample.
        "unit_scores": result.unit_scores,
        "items": items_path.name,
        "run_record": run_path.name,
    }))
    return dataclasses.replace(result, notes=[*result.notes, *ci_notes])
