"""Report plots (matplotlib, Agg backend): method bars, goal-following curve, training histogram, the
multi-aspect goal grids' heatmaps, and the online loops' rounds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_bars", "plot_goal_curve", "plot_histogram", "plot_aspect_heatmaps", "plot_loop_rounds"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Writes the figure atomically (a half-written PNG never looks finished) and closes it."""
    from gcsl.runinfo import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
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


def plot_goal_curve(out: Path, curves: dict[str, Any], metrics: list[str], feedback_scale: set[str]) -> Path | None:
    """Requested goal vs achieved score per curve variant, one panel per metric (primary, then check scorers).

    ``curves`` is the report's curve table (ordered goals, requested values, points per metric).
    The dotted diagonal (achieved = requested) is drawn only for a metric on the training
    feedback's scale (``feedback_scale``), where the two are comparable.
    """
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
        if metric in feedback_scale:
            lims = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
            ax.plot(lims, lims, ls=":", color="grey", label="achieved = requested")
        ax.set_xlabel("requested goal (threshold or value, training metric)")
        ax.set_ylabel(f"achieved {metric}")
        ax.legend(fontsize=8)
        ax.set_title(f"Goal following: {metric}")
    return _save(fig, out / "goal_curve.png")


def plot_histogram(out: Path, cfg, variants) -> Path | None:
    """Training scores with the thresholds drawn on them (and which were kept as goals)."""
    from gcsl.data.load import read_feedback
    from gcsl.experiments.layout import ExperimentLayout, is_multi_aspect, training_data
    from gcsl.methods import get_method

    layout = ExperimentLayout(out)
    # A beyond variant on the shared prepare options first: its kept goals are the experiment's own
    # (an unfiltered or re-binned variant would draw other thresholds).
    prepared = {v.name: layout.goal_setup(v.name) for v in variants}
    # A multi-aspect variant has one histogram per aspect, not this one: it is left out.
    candidates = sorted((v for v in variants if prepared[v.name] is not None and not is_multi_aspect(prepared[v.name])
                         and get_method(v.method).beyond
                         and get_method(v.method).is_goal_conditioned),
                        key=lambda v: bool(v.prepare))
    if not candidates:
        return None
    setup = prepared[candidates[0].name]

    # What the variants trained on: the log less the validation prompts when there are some.
    table, _ = read_feedback(training_data(cfg), score_column=cfg.prepare.get("score_column", "score"),
                             prompt_column=cfg.prepare.get("prompt_column", "prompt"),
                             response_column=cfg.prepare.get("response_column", "response"))
    spec = setup.metric
    raw = np.asarray(table.column("score_raw").to_pylist(), dtype=float)
    scores = np.array([spec.display(v) for v in spec.orient(raw)])  # the units thresholds are written in
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.hist(scores, bins=30, color="#999999")
    for k in setup.levels:
        t, kept = setup.threshold_display(k), k in setup.retained_levels
        ax.axvline(t, color="#C44E52" if kept else "#4C72B0", ls="-" if kept else "--", lw=1.2)
        ax.text(t, ax.get_ylim()[1] * 0.95, f"τ{k}", color="#C44E52" if kept else "#4C72B0", fontsize=8)
    ax.axvline(spec.display(setup.train_mean), color="black", ls=":", lw=1)
    ax.set_xlabel(f"training score ({spec.display_name}); red = kept goals, dotted = mean")
    ax.set_ylabel("responses")
    ax.set_title(f"Training feedback (n = {len(scores)}), K = {len(setup.thresholds)}")
    return _save(fig, out / "training_scores.png")


def plot_aspect_heatmaps(out: Path, grids: dict[str, Any], aspect_metrics: dict[str, list[str]]) -> list[Path]:
    """One heatmap per two-aspect variant and aspect metric: the first aspect's requested level (rows) x the
    second's (columns), colour = the metric's achieved mean, text = mean and 95% interval; * marks a level
    combination with no training row. Saved as ``heatmap-<variant>-<metric>.png``.

    ``grids`` is the report's :func:`gcsl.experiments.report.aspect_grids`, ``aspect_metrics`` each aspect's
    metrics by name; cells asking for a value rather
    than a level, and variants with other than two aspects, are not drawn.
    """
    from gcsl.experiments.layout import slug

    paths = []
    for name, g in grids.items():
        if len(g["aspects"]) != 2:
            continue
        cells = [c for c in g["cells"] if all(a["level"] is not None for a in c["aspects"])]
        rows = sorted({c["aspects"][0]["level"] for c in cells})
        cols = sorted({c["aspects"][1]["level"] for c in cells})
        # Each aspect's requested threshold by level, for the tick labels.
        asked = [{c["aspects"][a]["level"]: c["aspects"][a]["requested"] for c in cells} for a in (0, 1)]
        metrics = dict.fromkeys(m for a in g["aspects"] for m in aspect_metrics.get(a, []))
        for metric in metrics:
            drawn = [c for c in cells if metric in c["metrics"]]
            if not drawn:
                continue
            grid = np.full((len(rows), len(cols)), np.nan)
            plt = _plt()
            fig, ax = plt.subplots(figsize=(1.9 * len(cols) + 2, 1.2 * len(rows) + 1.5))
            for c in drawn:
                i, j = rows.index(c["aspects"][0]["level"]), cols.index(c["aspects"][1]["level"])
                m = c["metrics"][metric]
                grid[i, j] = m["mean"]
                low, high = ("—" if x is None else f"{x:.2f}" for x in (m["low"], m["high"]))
                ax.text(j, i, f"{m['mean']:.2f}{'*' if c['train_rows'] == 0 else ''}\n[{low}, {high}]",
                        ha="center", va="center", fontsize=8, bbox={"facecolor": "white", "alpha": 0.7, "lw": 0})
            image = ax.imshow(grid, cmap="viridis", aspect="auto")
            fig.colorbar(image, ax=ax, label=f"achieved {metric}")
            ax.set_yticks(range(len(rows)), [f"level {k} ({asked[0][k]:.4g})" for k in rows])
            ax.set_xticks(range(len(cols)), [f"level {k} ({asked[1][k]:.4g})" for k in cols])
            ax.set_ylabel(f"requested {g['aspects'][0]}")
            ax.set_xlabel(f"requested {g['aspects'][1]}")
            ax.set_title(f"{name}: {metric} (* never trained)")
            paths.append(_save(fig, out / f"heatmap-{slug(name)}-{slug(metric)}.png"))
    return paths


def plot_loop_rounds(out: Path, rows: list[dict[str, Any]]) -> Path | None:
    """Per loop variant (one row of panels), the samples' mean score and the top threshold against the round,
    one line per seed. ``rows`` are the report's :func:`gcsl.experiments.report.loop_rounds` rows; round 0 has
    no samples, so its score is a gap. Saved as ``loop_rounds.png``."""
    names = list(dict.fromkeys(r["variant"] for r in rows))
    if not names:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 3.2 * len(names)), squeeze=False, constrained_layout=True)
    for (score_ax, top_ax), name in zip(axes, names):
        mine = [r for r in rows if r["variant"] == name]
        for seed in dict.fromkeys(r["seed"] for r in mine):
            series = sorted((r["round"], r["mean_sample_score"], r["top_threshold"]) for r in mine if r["seed"] == seed)
            x, score, top = (np.array([np.nan if v is None else v for v in col], dtype=float) for col in zip(*series))
            score_ax.plot(x, score, marker="o", label=f"seed {seed}")
            top_ax.plot(x, top, marker="o", label=f"seed {seed}")
        for ax, what in ((score_ax, "mean sample score"), (top_ax, "top threshold")):
            ax.set_xlabel("round")
            ax.set_ylabel(what)
            ax.set_title(f"{name}: {what}")
            ax.set_xticks(sorted({r['round'] for r in mine}))  # whole rounds only, the same on both panels
            ax.legend(fontsize=8)
    return _save(fig, out / "loop_rounds.png")
