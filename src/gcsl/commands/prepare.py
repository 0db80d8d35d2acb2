"""`gcsl prepare`: feedback log -> goal-conditioned training data."""

from __future__ import annotations

import argparse

from gcsl import config
from gcsl.data.prepare import PrepareConfig, prepare
from gcsl.methods import METHODS, trained_methods


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser, PrepareConfig)
    # --method's choices come from the method table (via PrepareConfig); so does what each one does.
    parser.epilog = "methods: " + "; ".join(f"{name}: {METHODS[name].summary}" for name in trained_methods())


def run(args: argparse.Namespace) -> None:
    prepare(config.resolve_config(PrepareConfig, yaml_path=args.config, args=args))
