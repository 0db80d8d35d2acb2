"""`gcsl quickstart`: the offline first run — does the goal steer? One model, a low and a high goal.

It trains SmolLM2-135M-Instruct (offline, from a pip package) with GCSL-NL on a feedback log of
the base model's own movie reviews scored by VADER for negative sentiment, with goals led by a
level word ("Write a review that is negative (...)"), which a model this small reads where it
ignores numbers. 20 training titles are held out for the goal-sensitivity probe. The trained
model then writes reviews of held-out test titles at its lowest and at its highest goal; both are
scored by VADER and by TextBlob and compared with each other (paired per title) and with the
untrained model. It is `gcsl experiment` with the settings in ``gcsl/resources/quickstart.yaml``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gcsl.config import field, load_yaml, resolve_config

if TYPE_CHECKING:
    from gcsl.goals import GoalSetup

__all__ = ["QuickstartConfig", "quickstart", "resource_path"]


def resource_path(*parts: str) -> Path:
    return Path(__file__).resolve().parent.parent / "resources" / Path(*parts)


@dataclass
class QuickstartConfig:
    out: Path = field(Path("gcsl-quickstart"), help="where runs, report and plots go")
    max_steps: int | None = field(None, help="training steps (default: the shipped setting)")
    eval_prompts: int | None = field(None, help="use only the first N held-out prompts")


def quickstart(cfg: QuickstartConfig) -> dict:
    """Runs the quickstart experiment and prints whether the goal steers; returns the printed numbers."""
    from gcsl.experiments.runner import ExperimentConfig, run_experiment
    from gcsl.methods import get_method

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
    method = next(m for m in exp.methods if get_method(m).is_goal_conditioned)  # the one with goals to steer
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    say("gcsl quickstart: goal-conditioned fine-tuning, fully offline, on this machine's CPU/GPU.")
    say(f"  data: {made['feedback_rows']} reviews written by {made['model']} for {made['train_prompts']} movie titles, "
        f"scored by VADER for negative sentiment (mean {made['mean_score']:.2f}); {exp.validation_prompts} titles "
        "are held out of training for the goal-sensitivity probe.")
    say(f"  steps: prepare {method} goals -> LoRA fine-tune -> probe the goal on held-out titles -> generate at a "
        "low and a high goal on test titles -> score with VADER and TextBlob -> compare with the base model.")
    run_experiment(exp)
    return _summarise(Path(cfg.out), method)


def _summarise(out: Path, method: str) -> dict:
    """Prints the base model, the low and high goals, their paired difference and the probe."""
    from gcsl.experiments.layout import ExperimentLayout

    layout = ExperimentLayout(out)
    results = json.loads(layout.results_json.read_text(encoding="utf-8"))
    metric, check = results["metric"], (results.get("check_metrics") or [None])[0]
    stats = results["curve_statistics"][method][metric]
    low, high = stats["bottom_goal"], stats["top_goal"]
    points = results["goal_curves"][method]
    base = next(r for r in results["rows"] if r["variant"] == "base")
    setup = layout.goal_setup(method)

    def cell(p: dict) -> str:
        return f"{p['mean']:.3f} [{p['low']:.3f}, {p['high']:.3f}]"

    def second(goal: str) -> str:
        p = points[goal].get("check", {}).get(check)
        return f"   TextBlob {cell(p)}" if p else ""

    check_stats = results["curve_statistics"][method].get(check) or {}
    lines = ["", f"Negative-sentiment score of {stats['n_units']} held-out test titles' reviews (VADER mean, 95% "
             "bootstrap CI, seed 0):",
             f"  base model               {base['mean']:.3f} [{base['ci_low']:.3f}, {base['ci_high']:.3f}]",
             f"  {method}, low goal   {cell(points[low])}{second(low)}   ({low}: {_threshold(setup, low)})",
             f"  {method}, high goal  {cell(points[high])}{second(high)}   ({high}: {_threshold(setup, high)})",
             f"  high minus low goal      {stats['top_minus_bottom']:+.3f} [{stats['diff_low']:+.3f}, "
             f"{stats['diff_high']:+.3f}] (paired over prompts, p={stats['diff_p']:.3f})"
             + (f"   TextBlob {check_stats['top_minus_bottom']:+.3f} [{check_stats['diff_low']:+.3f}, "
                f"{check_stats['diff_high']:+.3f}]" if check_stats.get("top_goal") else ""),
             f"  top training bin's mean  {setup.metric.display(setup.top_bin_mean):.3f}"]
    probe = next((p for p in results.get("probe", []) if p["variant"] == method), None)
    if probe:
        lines.append(f"Goal sensitivity probe on {probe['n_rows']} held-out feedback rows: {probe['sensitivity']:+.4f} "
                     f"[{probe['ci_low']:+.4f}, {probe['ci_high']:+.4f}] nats/token, trend over all rows "
                     f"{probe['trend']:+.4f} [{probe['trend_low']:+.4f}, {probe['trend_high']:+.4f}] per level "
                     "(> 0: the high goal favours the more negative responses; heatmap "
                     + str(out / probe["heatmap"]) + ")")
    lines.append(f"Report: {layout.report}   plots: {out / 'goal_curve.png'}, {out / 'methods.png'}")
    print("\n".join(lines))
    return {"base": base, "low": points[low], "high": points[high], "statistics": stats, "probe": probe}


def _threshold(setup: GoalSetup, request: str) -> str:
    """What a goal request asks for, briefly: its level's word (when the goals have words) and threshold."""
    from gcsl.goals import inference_goal

    goal = inference_goal(setup, request)
    if goal.level is None:
        return request
    word = setup.level_word(goal.level)
    return f"{word + ', ' if word else ''}score >= {setup.threshold_display(goal.level)}"
