"""``gcsl evaluate``: score a generations file on one task (a thin layer over :func:`gcsl.evaluation.evaluate`).

    gcsl evaluate --task toxicity --generations gens.jsonl --out METRICS.json [--config cfg.yaml] [task options]

Task options appear below, grouped by task; an option shared by several tasks is listed once.
In a ``--config`` YAML file they go under ``task_options:``; options on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from typing import Any

from gcsl import config as gcsl_config
from gcsl.errors import ConfigError, GcslError
from gcsl.evaluation import TASKS, EvaluateConfig, evaluate, task_config_class
from gcsl.stages import text_safe


def _task_config_classes() -> dict[str, type]:
    classes = {}
    for task in TASKS:
        try:
            classes[task] = task_config_class(task)[1]
        except GcslError:
            continue  # a task that cannot load here adds no options; choosing it reports why
    return classes


def _cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gcsl_config.add_arguments(parser, EvaluateConfig)
    taken = {f.name for f in dataclasses.fields(EvaluateConfig)} | {"config"}
    for task, cls in _task_config_classes().items():
        fresh = [f for f in _cli_fields(cls) if f.name not in taken]
        if not fresh:
            continue
        hints = typing.get_type_hints(cls)
        # a dataclass of only the not-yet-added fields, so gcsl.config builds each option once
        only_new = dataclasses.make_dataclass(f"{cls.__name__}Options", [
            (f.name, hints[f.name], dataclasses.field(default=None, metadata=f.metadata)) for f in fresh])
        gcsl_config.add_arguments(_AbsentUnlessGiven(parser.add_argument_group(f"{task} options")), only_new,
                                  with_config=False)
        taken.update(f.name for f in fresh)


class _AbsentUnlessGiven:
    """An argument group whose options stay absent from the namespace unless given.

    Only the task options a user typed may override the YAML's ``task_options``; argparse's
    SUPPRESS default gives exactly that.
    """

    def __init__(self, group: Any):
        self._group = group

    def add_argument(self, *flags: str, **kwargs: Any) -> argparse.Action:
        return self._group.add_argument(*flags, **{**kwargs, "default": argparse.SUPPRESS})


def run(args: argparse.Namespace) -> None:
    cfg = gcsl_config.resolve_config(EvaluateConfig, yaml_path=args.config, args=args)
    classes = _task_config_classes()
    chosen = classes.get(cfg.task)
    chosen_names = {f.name for f in _cli_fields(chosen)} if chosen else set()
    all_names = {f.name for cls in classes.values() for f in _cli_fields(cls)}
    given = {name: getattr(args, name) for name in all_names if hasattr(args, name)}
    foreign = sorted(set(given) - chosen_names)
    if foreign:
        raise ConfigError(f"{', '.join('--' + n.replace('_', '-') for n in foreign)}: not an option of task "
                          f"{cfg.task}; drop it or choose the task it belongs to")
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
