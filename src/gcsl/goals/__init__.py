"""Goals from graded feedback as pure steps: quantize -> formulate -> render.

No model and no I/O happen here (``GoalSetup.load`` aside): data preparation and inference
both call these functions, so a goal is written the same way at training and at generation.
"""

from gcsl.goals.aspects import Aspect, MultiGoalSetup, read_aspects
from gcsl.goals.formulate import (
    Formulation,
    FormulationInput,
    Pairs,
    formulate_all,
    formulate_beyond,
    formulate_classic,
    formulate_dpo_pairs,
    formulate_sampled_pairs,
    formulate_sft,
    retained_levels,
)
from gcsl.goals.quantize import Quantization, assign_levels, quantize_feedback
from gcsl.goals.render import default_templates, place_goal, render_goal, reward_token
from gcsl.goals.setup import Goal, GoalSetup, inference_goal
from gcsl.goals.spec import MetricSpec

__all__ = [
    "MetricSpec",
    "Quantization",
    "quantize_feedback",
    "assign_levels",
    "Formulation",
    "FormulationInput",
    "Pairs",
    "retained_levels",
    "formulate_classic",
    "formulate_all",
    "formulate_beyond",
    "formulate_sft",
    "formulate_dpo_pairs",
    "formulate_sampled_pairs",
    "default_templates",
    "render_goal",
    "reward_token",
    "place_goal",
    "Goal",
    "GoalSetup",
    "inference_goal",
    "Aspect",
    "read_aspects",
    "MultiGoalSetup",
]


def __getattr__(name: str):
    """``METHODS`` and ``GOAL_STYLE`` as before the method table (see :mod:`gcsl.methods`)."""
    if name in ("METHODS", "GOAL_STYLE"):
        from gcsl.goals import render

        return getattr(render, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
