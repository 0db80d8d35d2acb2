"""gcsl: goal-conditioned supervised fine-tuning of LLMs from graded feedback.

The public API is re-exported here; submodules are private to the package layout.
Heavy stacks (torch, transformers) are imported lazily, so ``import gcsl`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from gcsl.errors import (  # noqa: E402
    ConfigError,
    DataError,
    GcslError,
    MissingDependencyError,
    SandboxError,
    StageError,
)

# name -> module that defines it; resolved on first attribute access.
_LAZY = {
    "MetricSpec": "gcsl.goals",
    "GoalSetup": "gcsl.goals",
    "quantize_feedback": "gcsl.goals",
    "inference_goal": "gcsl.goals",
    "render_goal": "gcsl.goals",
    "PrepareConfig": "gcsl.data.prepare",
    "prepare": "gcsl.data.prepare",
}

__all__ = [
    "__version__",
    "GcslError",
    "ConfigError",
    "DataError",
    "MissingDependencyError",
    "SandboxError",
    "StageError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gcsl' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
