"""`gcsl experiment --config FILE`: methods x seeds through every stage, then a report."""

from __future__ import annotations

import argparse

from gcsl import config
from gcsl.experiments.runner import ExperimentConfig, run_experiment


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser, ExperimentConfig)


def run(args: argparse.Namespace) -> None:
    report = run_experiment(config.resolve_config(ExperimentConfig, yaml_path=args.config, args=args))
    print(report.read_text())
