"""`gcsl generate`: sample completions at a chosen goal, e.g.

    gcsl generate --model runs/gcsl-bey-nl --prompts prompts.jsonl --goal top --num-samples 2 --out gens.jsonl
"""

from __future__ import annotations

import argparse

from gcsl import config
from gcsl.generation.generate import GenerateConfig, generate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser, GenerateConfig)


def run(args: argparse.Namespace) -> None:
    out = generate(config.resolve_config(GenerateConfig, yaml_path=args.config, args=args))
    print(f"wrote {out}")
