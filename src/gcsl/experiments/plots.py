"""Report plots (matplotlib, Agg backend): method bars, goal-following curve, training histogram."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_bars", "plot_goal_curve", "plot_histogram"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from gcsl.experiments.report import _save_fig

    _save_fig(fig, path)
    _plt().close(fig)
    return path


def plot_bars(out: Path, rows: list[dict[str, Any]], metric: str) -> Path | None:
    """Each variant's mean at the top goal with its 95% interval."""
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(rows)), 3.5))
    means = np.array([r["mean"] for r in rows])
    lo = np.array([r["ci_low"] if r["ci_low"] is not None else r["mean"] for r in rows])
    hi = np.array([r["ci_high"] if r["ci_high"] is not None else r["mean"] for r in rows])
    ax.bar(range(len(rows)), means, yerr=[means - lo, hi - means], capsize=4, color="#4C72B0")
    ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} at the top goal (95% CI, n = {rows[0]['n_units']} prompts)")
    return _save(fig, out / "methods.png")


def plot_goal_curve(out: Path, cfg, results: dict[str, Any]) -> Path | None:
    """Requested goal (threshold in metric units) vs achieved score, for variants with several goals."""
    from gcsl.goals import GoalSetup, inference_goal

    curves = {n: r for n, r in results.items() if len(r["goals"]) > 1}
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, r in curves.items():
        setup = GoalSetup.load(Path(cfg.out) / "runs" / name / "prepared" / "goals.json")
        pts = []
        for goal, d in r["goals"].items():
            g = inference_goal(setup, goal)
            x = g.threshold if g.threshold is not None else g.value
            pts.append((x, d["mean"], d["low"], d["high"]))
        pts.sort()
        x, y, lo, hi = (np.array(v, dtype=float) for v in zip(*pts))
        ax.errorbar(x, y, yerr=[y - lo, hi - y], marker="o", capsize=3, label=name)
    lims = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
    ax.plot(lims, lims, ls=":", color="grey", label="achieved = requested")
    ax.set_xlabel("requested goal (threshold)")
    ax.set_ylabel(f"achieved {cfg.primary_metric}")
    ax.legend(fontsize=8)
    ax.set_title("Goal following")
    return _save(fig, out / "goal_curve.png")


def plot_histogram(out: Path, cfg, variants) -> Path | None:
    """Training scores with the thresholds drawn on them (and which were kept as goals)."""
    prepared = next((Path(cfg.out) / "runs" / v.name / "prepared" for v in variants
                     if (Path(cfg.out) / "runs" / v.name / "prepared" / "goals.json").exists()
                     and v.method.startswith("gcsl-bey")), None)
    if prepared is None:
        return None
    goals = json.loads((prepared / "goals.json").read_text())
    from gcsl.data.load import read_feedback

    table, _ = read_feedback(cfg.data, score_column=cfg.prepare.get("score_column", "score"),
                             prompt_column=cfg.prepare.get("prompt_column", "prompt"),
                             response_column=cfg.prepare.get("response_column", "response"))
    from gcsl.goals import MetricSpec

    spec = MetricSpec.from_json(goals["metric"])
    raw = np.asarray(table.column("score_raw").to_pylist(), dtype=float)
    scores = np.array([spec.display(v) for v in spec.orient(raw)])  # the units thresholds are written in
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.hist(scores, bins=30, color="#999999")
    for k, t in zip(goals["levels"], goals["thresholds"]):
        kept = k in goals["retained_levels"]
        ax.axvline(t, color="#C44E52" if kept else "#4C72B0", ls="-" if kept else "--", lw=1.2)
        ax.text(t, ax.get_ylim()[1] * 0.95, f"τ{k}", color="#C44E52" if kept else "#4C72B0", fontsize=8)
    ax.axvline(goals["train_mean"], color="black", ls=":", lw=1)
    ax.set_xlabel(f"training score ({goals['metric']['display_name']}); red = kept goals, dotted = mean")
    ax.set_ylabel("responses")
    ax.set_title(f"Training feedback (n = {len(scores)}), K = {goals['bins_used']}")
    return _save(fig, out / "training_scores.png")
