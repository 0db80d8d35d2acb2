"""``gcsl data``: build a task's data, its feedback log and prompt files (a thin layer over ``Task.build_data``).

    gcsl data TASK --out DIR [--overwrite] [--config data.yaml] [TASK's data options]

Each task is a subcommand with only its own options (``gcsl data recommendation -h``); a
``--config`` YAML file holds any of them, and options on the command line win. ``DIR`` is
written whole or not at all, and an existing non-empty ``DIR`` needs ``--overwrite``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gcsl import config as gcsl_config
from gcsl.cli import add_task_parsers
from gcsl.commands.evaluate import AbsentUnlessGiven, cli_fields
from gcsl.tasks import get_task
from gcsl.tasks.base import Task


def add_arguments(parser: argparse.ArgumentParser, task: str | None = None) -> None:
    def options(sub: argparse.ArgumentParser, chosen: Task | None) -> None:
        sub.add_argument("--out", type=Path, required=True, help="folder to write the files into")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out folder")
        sub.add_argument("--config", type=Path, default=None,
                         help="YAML file with any of the task's data options (CLI options override it)")
        if chosen is not None:
            group = sub.add_argument_group(f"{chosen.name} data options")
            gcsl_config.add_arguments(AbsentUnlessGiven(group), chosen.data_config, with_config=False)

    add_task_parsers(parser, task, options)


def run(args: argparse.Namespace) -> None:
    task = get_task(args.task)
    options = gcsl_config.load_yaml(args.config) if args.config else {}
    options.update({f.name: getattr(args, f.name) for f in cli_fields(task.data_config) if hasattr(args, f.name)})
    files = task.build_data(args.out, overwrite=args.overwrite, **options)
    print(f"{task.name}: wrote {len(files)} file(s) to {args.out}")
    for path in files:
        print(f"  {path}")
