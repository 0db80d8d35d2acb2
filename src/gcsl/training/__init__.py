"""Training: `gcsl train` (LoRA fine-tuning with TRL/PEFT/accelerate) and `gcsl merge`.

Importing this package stays light; torch, transformers and TRL load when a workflow runs.
"""

from gcsl.training.merge import MergeConfig, merge
from gcsl.training.train import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train", "MergeConfig", "merge"]
