"""`gcsl merge`: fold a trained adapter into its base model, e.g.

    gcsl merge --model runs/gcsl-bey-nl --out runs/gcsl-bey-nl-merged
"""

from __future__ import annotations

import argparse

from gcsl import config
from gcsl.training.merge import MergeConfig, merge


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser, MergeConfig)


def run(args: argparse.Namespace) -> None:
    out = merge(config.resolve_config(MergeConfig, yaml_path=args.config, args=args))
    print(f"wrote {out}")
