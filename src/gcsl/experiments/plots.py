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


def plot_goal_curve(out: Path, cfg, curves: dict[str, Any], metrics: list[str]) -> Path | None:
    """Requested goal vs achieved score per curve variant, one panel per metric (primary, then check scorers).

    ``curves`` is the report's curve table (ordered goals, requested values, points per metric).
    The dotted diagonal (achieved = requested) is drawn only for a metric on the training
    feedback's scale, where the two are comparable.
    """
    from gcsl.experiments.report import _FEEDBACK_SCALE_METRICS

    drawn = {n: c for n, c in curves.items() if all(c["requested"].get(g) is not None for g in c["requested"])}
    if not drawn:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name, c in drawn.items():
            pts = sorted((c["requested"][g], p[metric]["mean"], p[metric]["low"], p[metric]["high"])
                         for g, p in c["points"].items() if metric in p)
            if not pts:
                continue
            x, y, lo, hi = (np.array([np.nan if v is None else v for v in col], dtype=float) for col in zip(*pts))
            lo, hi = np.where(np.isnan(lo), y, lo), np.where(np.isnan(hi), y, hi)
            ax.errorbar(x, y, yerr=[y - lo, hi - y], marker="o", capsize=3, label=name)
        if (cfg.task, metric) in _FEEDBACK_SCALE_METRICS:
            lims = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
            ax.plot(lims, lims, ls=":", color="grey", label="achieved = requested")
        ax.set_xlabel("requested goal (threshold or value, training metric)")
        ax.set_ylabel(f"achieved {metric}")
        ax.legend(fontsize=8)
        ax.set_title(f"Goal following: {metric}")
    return _save(fig, out / "goal_curve.png")


def plot_histogram(out: Path, cfg, variants) -> Path | None:
    """Training scores with the thresholds drawn on them (and which were kept as goals)."""
    from gcsl.experiments.runner import stage_paths, training_data

    # A beyond variant on the shared prepare options first: its kept goals are the experiment's own
    # (an unfiltered or re-binned variant would draw other thresholds).
    candidates = sorted((v for v in variants if v.method.startswith("gcsl-bey")
                         and (stage_paths(cfg.out, v.name, 0)["prepared"] / "goals.json").exists()),
                        key=lambda v: bool(v.prepare))
    if not candidates:
        return None
    prepared = stage_paths(cfg.out, candidates[0].name, 0)["prepared"]
    goals = json.loads((prepared / "goals.json").read_text())
    from gcsl.data.load import read_feedback

    # What the variants trained on: the log less the validation prompts when there are some.
    table, _ = read_feedback(training_data(cfg), score_column=cfg.prepare.get("score_column", "score"),
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
