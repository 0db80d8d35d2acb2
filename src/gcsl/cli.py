"""The ``gcsl`` command: a thin layer that parses options and calls one workflow function.

Each subcommand lives in ``gcsl.commands.<name>`` and is imported only when used, so that
``gcsl prepare`` never imports torch.

``gcsl evaluate`` and ``gcsl data`` take the task as a subcommand (``gcsl evaluate sentiment
...``), each with only its own options. Only the named task's package is imported, so evaluating
sentiment never imports the code sandbox or sentence-transformers; the older ``--task X`` form (or
``task:`` in the ``--config`` file) is moved into place before parsing.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from gcsl.errors import ConfigError, GcslError

__all__ = ["main", "task_first", "add_task_parsers"]

_COMMANDS = {
    "prepare": "turn a feedback log into goal-conditioned training data",
    "train": "LoRA fine-tune a causal LM on prepared data",
    "merge": "merge a trained adapter into a full model",
    "generate": "sample from a trained model at a chosen goal",
    "probe": "measure whether the goal steers a trained model (log-probabilities, no generation)",
    "evaluate": "score generations for a task and write metrics",
    "data": "build a task's data: feedback log and prompt files",
    "experiment": "run methods x seeds: prepare, train, generate, evaluate, report",
    "quickstart": "offline demo: does the goal steer? one model at a low and a high goal, beside the base model",
}
# Commands with one subcommand per task: they see the task named on the command line.
_PER_TASK = ("evaluate", "data")


def task_first(argv: list[str]) -> list[str]:
    """The arguments after ``gcsl evaluate`` / ``gcsl data`` with the task name first.

    The task is the first argument, or ``--task X`` / ``--task=X`` anywhere, or ``task:`` in the
    ``--config`` YAML file. An unknown task is a one-line ConfigError listing the valid names.

    >>> task_first(["--generations", "g.jsonl", "--task", "code", "--k", "1"])
    ['code', '--generations', 'g.jsonl', '--k', '1']
    """
    from gcsl.config import load_yaml
    from gcsl.tasks import get_task

    rest, flagged = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--task" and i + 1 < len(argv):
            flagged.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--task="):
            flagged.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    named = rest[0] if rest and not rest[0].startswith("-") else None
    if len(set(flagged) | ({named} if named else set())) > 1:
        raise ConfigError(f"--task: names {', '.join(sorted(set(flagged) | {named} - {None}))}; give one task")
    task = named or (flagged[0] if flagged else None)
    if task is None and "--config" in rest[:-1]:
        from_yaml = load_yaml(rest[rest.index("--config") + 1]).get("task")
        task = str(from_yaml) if from_yaml is not None else None
    if task is None:
        if "-h" in argv or "--help" in argv:
            return argv
        from gcsl.tasks import TASKS

        raise ConfigError(f"TASK: missing; name the task first (one of {', '.join(TASKS)}), e.g. "
                          "`gcsl evaluate sentiment --generations gens.jsonl --out METRICS.json`")
    get_task(task)  # an unknown name: one line listing the valid ones
    return rest if named else [task, *rest]


def add_task_parsers(parser: argparse.ArgumentParser, chosen: str | None,
                     add_options: Callable[[argparse.ArgumentParser, object | None], None]) -> None:
    """One subparser per registered task; ``add_options(subparser, task)`` gets the Task only for ``chosen``
    (None for the others, which then carry only the options every task shares)."""
    from gcsl.tasks import TASKS, get_task

    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for name in TASKS:
        task = get_task(name) if name == chosen else None
        p = sub.add_parser(name, help=task.summary if task else f"`{parser.prog} {name} -h` lists its options",
                           description=task.summary if task else None)
        add_options(p, task)


def _build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None, list[str]]:
    parser = argparse.ArgumentParser(prog="gcsl", description="Goal-conditioned supervised fine-tuning of LLMs.")
    parser.add_argument("--version", action="version", version=f"gcsl {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, help_text in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(f"gcsl.commands.{name}")
            if name in _PER_TASK:
                at = argv.index(name) + 1
                argv = argv[:at] + task_first(argv[at:])
                module.add_arguments(p, argv[at] if at < len(argv) and not argv[at].startswith("-") else None)
            else:
                module.add_arguments(p)
    return parser, module, argv


def _version() -> str:
    from gcsl import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser, module, argv = _build_parser(argv)
        args, extra = parser.parse_known_args(argv)
        if extra:
            flags = [a.split("=", 1)[0] for a in extra if a.startswith("-")]
            if args.command in _PER_TASK and getattr(args, "task", None) and flags:
                raise ConfigError(f"{', '.join(flags)}: not an option of task {args.task}; drop it or choose the "
                                  f"task it belongs to (`gcsl {args.command} {args.task} -h` lists its options)")
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if module is None:
            parser.print_help()
            return 2
        module.run(args)
    except GcslError as exc:
        print(f"gcsl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("gcsl: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
