"""`gcsl quickstart`: the offline first run — GCSL-bey-NL vs the base model on shipped data.

It trains SmolLM2-135M-Instruct (offline, from a pip package) with GCSL-bey-NL on a feedback log
of the base model's own movie reviews scored by VADER for negative sentiment (the rarer
sentiment for this model, so the top goal asks for a minority behaviour), generates at the top
goal on held-out titles, and compares with the untrained model. It is `gcsl experiment` with
the settings in ``gcsl/resources/quickstart.yaml``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from gcsl.config import field, load_yaml, resolve_config

__all__ = ["QuickstartConfig", "quickstart", "resource_path"]


def resource_path(*parts: str) -> Path:
    return Path(__file__).resolve().parent.parent / "resources" / Path(*parts)


@dataclass
class QuickstartConfig:
    out: Path = field(Path("gcsl-quickstart"), help="where runs, report and plots go")
    max_steps: int | None = field(None, help="training steps (default: the shipped setting)")
    eval_prompts: int | None = field(None, help="use only the first N held-out prompts")


def quickstart(cfg: QuickstartConfig) -> dict:
    """Runs the quickstart experiment and prints the comparison; returns the results summary."""
    from gcsl.experiments.runner import ExperimentConfig, run_experiment

    settings = load_yaml(resource_path("quickstart.yaml"))
    data = resource_path("sentiment", "feedback.jsonl")
    prompts = resource_path("sentiment", "test_prompts.jsonl")
    made = json.loads(resource_path("sentiment", "made_by.json").read_text())
    if cfg.max_steps is not None:
        settings["train"]["max_steps"] = cfg.max_steps
    if cfg.eval_prompts is not None:
        settings["generate"]["limit"] = cfg.eval_prompts
    exp = resolve_config(ExperimentConfig, overrides={**settings, "data": str(data), "eval_prompts": str(prompts),
                                                      "out": cfg.out})
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    say("gcsl quickstart: goal-conditioned fine-tuning, fully offline, on this machine's CPU/GPU.")
    say(f"  data: {made['feedback_rows']} reviews written by {made['model']} for {made['train_prompts']} movie titles, "
        f"scored by VADER for negative sentiment (mean {made['mean_score']:.2f}).")
    say("  steps: prepare GCSL-bey-NL goals -> LoRA fine-tune -> generate at the top goal on held-out titles "
        "-> score -> compare with the base model.")
    run_experiment(exp)
    results = json.loads((Path(cfg.out) / "results.json").read_text())
    rows = {r["variant"]: r for r in results["rows"]}
    base, ours = rows["base"], rows["gcsl-bey-nl"]
    goals = json.loads((Path(cfg.out) / "runs" / "gcsl-bey-nl" / "prepared" / "goals.json").read_text())
    lines = [
        "",
        f"Top goal: {goals['inference_goal']['text']}",
        f"Negative-sentiment score on {ours['n_units']} held-out prompts (mean, 95% bootstrap CI, seed 0):",
        f"  base model     {base['mean']:.3f}  [{base['ci_low']:.3f}, {base['ci_high']:.3f}]  n={base['n_units']}",
        f"  GCSL-bey-NL    {ours['mean']:.3f}  [{ours['ci_low']:.3f}, {ours['ci_high']:.3f}]  n={ours['n_units']}",
        f"  difference     {ours['diff_vs_baseline']:+.3f}  [{ours['diff_low']:+.3f}, {ours['diff_high']:+.3f}] "
        f"(paired bootstrap p={ours['bootstrap_p']:.3f})",
        f"  top training bin mean {goals['top_bin_mean']:.3f}",
        f"Report: {Path(cfg.out) / 'report.md'}   plot: {Path(cfg.out) / 'methods.png'}",
    ]
    print("\n".join(lines))
    return {"base": base, "gcsl-bey-nl": ours}
