"""`gcsl probe`: has the goal become a control? Forward passes only, e.g.

    gcsl probe --model runs/gcsl-bey-nl --data validation.jsonl --out runs/gcsl-bey-nl-probe
"""

from __future__ import annotations

import argparse

from gcsl import config
from gcsl.probe import ProbeConfig, run_probe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser, ProbeConfig)


def run(args: argparse.Namespace) -> None:
    cfg = config.resolve_config(ProbeConfig, yaml_path=args.config, args=args)
    summary = run_probe(cfg)
    print(f"goal sensitivity ({summary['method']}, n={summary['n_rows']} rows, bins {summary['bottom_bin']} vs "
          f"{summary['top_bin']}): {summary['sensitivity']:+.4f} nats/token "
          f"[{summary['ci_low']:+.4f}, {summary['ci_high']:+.4f}]; trend over all rows "
          f"{summary['trend']:+.4f} [{summary['trend_low']:+.4f}, {summary['trend_high']:+.4f}] per level")
    print(f"wrote {cfg.out / 'probe.json'} and {cfg.out / 'probe.png'}")
