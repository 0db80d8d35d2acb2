"""`gcsl prepare`: feedback log -> goal-conditioned training data."""

from __future__ import annotations

import argparse

from gcsl import config
from gcsl.data.prepare import PrepareConfig, prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser, PrepareConfig)


def run(args: argparse.Namespace) -> None:
    prepare(config.resolve_config(PrepareConfig, yaml_path=args.config, args=args))
