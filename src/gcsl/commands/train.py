"""`gcsl train`: LoRA fine-tune a causal LM on prepared data, e.g.

    gcsl train --data prep/gcsl-bey-nl --out runs/gcsl-bey-nl
    accelerate launch --config_file configs/accelerate/multi_gpu_ddp.yaml -m gcsl.cli train --data ... --out ...
"""

from __future__ import annotations

import argparse
import os

from gcsl import config
from gcsl.training.train import TrainConfig, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser, TrainConfig)


def run(args: argparse.Namespace) -> None:
    result = train(config.resolve_config(TrainConfig, yaml_path=args.config, args=args))
    if int(os.environ.get("RANK", "0")) == 0:  # one line, not one per process under a launcher
        print(f"wrote {result.out} ({result.method}, {result.global_step} steps, final loss {result.train_loss:.4f})")
