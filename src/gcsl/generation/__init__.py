"""Goal-conditioned sampling from trained (or base) models."""

from gcsl.generation.generate import GenerateConfig, PromptRow, generate, load_prompts

__all__ = ["GenerateConfig", "PromptRow", "generate", "load_prompts"]
