"""`gcsl quickstart`: offline demo of GCSL-bey-NL against the base model."""

from __future__ import annotations

import argparse

from gcsl import config
from gcsl.experiments.quickstart import QuickstartConfig, quickstart


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser, QuickstartConfig, with_config=False)


def run(args: argparse.Namespace) -> None:
    quickstart(config.resolve_config(QuickstartConfig, args=args))
