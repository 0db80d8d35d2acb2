"""``gcsl evaluate``: score a generations file on one task (a thin layer over :func:`gcsl.evaluation.evaluate`).

    gcsl evaluate TASK --generations gens.jsonl --out METRICS.json [--config cfg.yaml] [TASK's options]
    gcsl evaluate --task TASK ...            (the older form, same meaning)

Each task is a subcommand with only its own options (``gcsl evaluate recommendation -h``). In a
``--config`` YAML file they go under ``task_options:``; options on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Any

from gcsl import config as gcsl_config
from gcsl.cli import add_task_parsers
from gcsl.evaluation import EvaluateConfig, evaluate
from gcsl.stages import text_safe
from gcsl.tasks import get_task
from gcsl.tasks.base import Task


def add_arguments(parser: argparse.ArgumentParser, task: str | None = None) -> None:
    """The shared options on every task's subparser; ``task``'s own options on its subparser only."""

    def options(sub: argparse.ArgumentParser, chosen: Task | None) -> None:
        gcsl_config.add_arguments(sub, EvaluateConfig)
        if chosen is not None:
            group = sub.add_argument_group(f"{chosen.name} options")
            gcsl_config.add_arguments(AbsentUnlessGiven(group), chosen.eval_config, with_config=False)

    add_task_parsers(parser, task, options)


class AbsentUnlessGiven:
    """An argument group whose options stay absent from the namespace unless given.

    Only the task options a user typed may override the YAML's ``task_options``; argparse's
    SUPPRESS default gives exactly that.
    """

    def __init__(self, group: Any):
        self._group = group

    def add_argument(self, *flags: str, **kwargs: Any) -> argparse.Action:
        return self._group.add_argument(*flags, **{**kwargs, "default": argparse.SUPPRESS})


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a config dataclass that are command-line options."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def run(args: argparse.Namespace) -> None:
    task = get_task(args.task)
    cfg = gcsl_config.resolve_config(EvaluateConfig, yaml_path=args.config, args=args)
    given = {f.name: getattr(args, f.name) for f in cli_fields(task.eval_config) if hasattr(args, f.name)}
    cfg = dataclasses.replace(cfg, task_options={**cfg.task_options, **given})
    result = evaluate(cfg)
    intervals = json.loads(cfg.out.read_text(encoding="utf-8")).get("ci", {})
    print(f"{result.task}: {result.n_generations} generations, {result.n_units} units -> {cfg.out}")
    for name, value in result.metrics.items():
        ci = intervals.get(name)
        span = f"  [{_fmt(ci['low'])}, {_fmt(ci['high'])}] n={ci['n']}" if ci and ci.get("low") is not None else ""
        print(f"  {text_safe(name):<24} {_fmt(value)}{span}")
    for note in result.notes:
        print(f"  note: {text_safe(note)}")


def _fmt(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "undefined"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
