"""The evaluate workflow: score a generations file on one task and write metrics with intervals.

Read top to bottom, :func:`evaluate`

1. reads the generations JSONL (``gcsl generate --out``), checking every line;
2. builds the task's config from ``task_options`` and calls ``gcsl.tasks.<task>.evaluate``;
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
import importlib
import inspect
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gcsl.config import config_to_dict, field, resolve_config
from gcsl.errors import DataError, StageError
from gcsl.metrics.stats import mean_ci
from gcsl.runinfo import atomic_path, atomic_write_json, package_versions, write_run_record
from gcsl.tasks.base import TaskResult

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

# task -> (module, config class); the modules are imported lazily by name
TASKS: dict[str, tuple[str, str]] = {
    "toxicity": ("gcsl.tasks.toxicity", "ToxicityEvalConfig"),
    "sentiment": ("gcsl.tasks.sentiment", "SentimentEvalConfig"),
    "code": ("gcsl.tasks.code", "CodeEvalConfig"),
    "recommendation": ("gcsl.tasks.recommendation", "RecommendationEvalConfig"),
}


@dataclass
class EvaluateConfig:
    """What ``gcsl evaluate`` needs; task-specific options live in ``task_options``."""

    task: Literal["toxicity", "sentiment", "code", "recommendation"] = field(
        help="task whose evaluator scores the generations")
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
        if not 0.0 < self.ci_confidence < 1.0:
            problems.append(f"ci_confidence: must be between 0 and 1, got {self.ci_confidence}")
        if self.ci_samples < 1:
            problems.append(f"ci_samples: must be >= 1, got {self.ci_samples}")
        if Path(self.out).resolve() == Path(self.generations).resolve():
            problems.append("out: must differ from --generations (it would overwrite the generations)")
        return problems


def iter_jsonl(path: Path, what: str = "JSONL") -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields ``(line_number, object)`` for each non-blank line; a bad line is a one-line DataError.

    >>> next(iter_jsonl(Path("gens.jsonl")))  # doctest: +SKIP
    (1, {'prompt_id': 'p1', ...})
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found; check the path")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte "
                                f"{exc.start + 1} of the line); a {what} file must be UTF-8 encoded JSON lines"
                                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                f"each line of a {what} file must be one JSON object") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}; "
                                f"each line of a {what} file must be one JSON object")
            yield lineno, obj


def read_generations(path: Path) -> list[dict[str, Any]]:
    """Generation rows of a ``gcsl generate`` output, each with ``prompt_id`` and ``completion``.

    A ``completion`` that is not text is kept: it is the model's output and the task scores it
    as unscorable. A missing field or an empty file is the file's fault and stops here.

    >>> rows = read_generations(Path("gens.jsonl"))  # doctest: +SKIP
    """
    rows = []
    for lineno, obj in iter_jsonl(path, "generations"):
        for key in ("prompt_id", "completion"):
            if key not in obj:
                raise DataError(f"{path}:{lineno}: missing field '{key}'; generation rows need prompt_id, prompt, "
                                "completion (see `gcsl generate`)")
        if not isinstance(obj["prompt_id"], (str, int)) or isinstance(obj["prompt_id"], bool):
            raise DataError(f"{path}:{lineno}: field 'prompt_id' must be a string, got {obj['prompt_id']!r}")
        rows.append(obj)
    if not rows:
        raise DataError(f"{path}: no generations in the file; run `gcsl generate` first")
    return rows


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Writes one JSON object per line, atomically (NaN and infinities become null).

    >>> write_jsonl(Path("prompts.jsonl"), [{"id": "p1", "prompt": "Hello"}])  # doctest: +SKIP
    """
    with atomic_path(Path(path)) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(_json_line(row))


def _json_line(row: Any) -> str:
    return json.dumps(_json_safe(row), ensure_ascii=False, allow_nan=False) + "\n"


def _text_safe(text: str) -> str:
    """``text`` itself, or with what UTF-8 cannot encode (lone surrogates) backslash-escaped."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, str):
        return _text_safe(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {_text_safe(str(k)): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _json_safe(obj.item())
    return obj


def task_config_class(task: str) -> tuple[Any, type]:
    """The task's module and its evaluation config class, imported on demand.

    >>> task_config_class("sentiment")[1].__name__
    'SentimentEvalConfig'
    """
    if task not in TASKS:
        raise StageError(f"task: {task!r} is not one of {', '.join(TASKS)}")
    module_name, class_name = TASKS[task]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise StageError(f"task {task!r} is not available in this installation ({module_name} is missing)") from None
    return module, getattr(module, class_name)


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
    module, config_cls = task_config_class(cfg.task)
    task_cfg = resolve_config(config_cls, overrides=dict(cfg.task_options))
    items_path, run_path = output_paths(out)
    partial = items_path.with_name(items_path.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)

    journal = partial.open("w", encoding="utf-8")
    try:
        def keep(item: dict[str, Any]) -> None:
            journal.write(_json_line(item))
            journal.flush()

        streams = "on_item" in inspect.signature(module.evaluate).parameters
        result: TaskResult = module.evaluate(rows, task_cfg, **({"on_item": keep} if streams else {}))
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
    goal_requests = sorted({_text_safe(str(r.get("goal_request"))) for r in rows if r.get("goal_request") is not None})
    goals = sorted({_text_safe(r["goal"]) for r in rows if isinstance(r.get("goal"), str)})
    # one record per METRICS file: several evaluations may share a directory, so not run.json
    write_run_record(run_path.parent, stage="evaluate", config=cfg, seed=cfg.ci_seed,
                     goals={"goal_requests": goal_requests, "goals": goals},
                     extra={"task_config": _json_safe(config_to_dict(task_cfg)),
                            "task_options_in_force": _json_safe(result.options)}, filename=run_path.name)
    atomic_write_json(out, _json_safe({
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
