"""The ``gcsl`` command: a thin layer that parses options and calls one workflow function.

Each subcommand lives in ``gcsl.commands.<name>`` and is imported only when used, so that
``gcsl prepare`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gcsl.errors import GcslError

_COMMANDS = {
    "prepare": "turn a feedback log into goal-conditioned training data",
    "train": "LoRA fine-tune a causal LM on prepared data",
    "merge": "merge a trained adapter into a full model",
    "generate": "sample from a trained model at a chosen goal",
    "probe": "measure whether the goal steers a trained model (log-probabilities, no generation)",
    "evaluate": "score generations for a task and write metrics",
    "experiment": "run methods x seeds: prepare, train, generate, evaluate, report",
    "quickstart": "offline demo: does the goal steer? one model at a low and a high goal, beside the base model",
}


def _build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(prog="gcsl", description="Goal-conditioned supervised fine-tuning of LLMs.")
    parser.add_argument("--version", action="version", version=f"gcsl {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, help_text in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(f"gcsl.commands.{name}")
            module.add_arguments(p)
    return parser, module


def _version() -> str:
    from gcsl import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser, module = _build_parser(argv)
        args = parser.parse_args(argv)
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
