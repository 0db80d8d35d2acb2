"""The experiment report: tables with intervals and paired tests, and the plots."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from gcsl.metrics.stats import mean_ci, paired_bootstrap, paired_ttest
from gcsl.runinfo import atomic_path, atomic_write_json, atomic_write_text

__all__ = ["write_report", "collect_results"]


# (task, metric) pairs whose metric is the mean of the training feedback's own score, higher = better.
_FEEDBACK_SCALE_METRICS = {("sentiment", "mean_score")}
# Per-unit scores stay out of results.json's goal curves (one value per prompt each).
_UNIT_KEYS = ("units", "per_seed_units")


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _unit_means(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """Each unit's score averaged over the seeds that have it (the unit of resampling is the prompt)."""
    acc: dict[str, list[float]] = {}
    for scores in per_seed:
        for unit, v in scores.items():
            if v is not None and np.isfinite(v):
                acc.setdefault(unit, []).append(float(v))
    return {u: float(np.mean(v)) for u, v in acc.items()}


def collect_results(cfg, variants) -> dict[str, Any]:
    """Per variant and goal: per-seed metrics, unit scores pooled over seeds, interval, n."""
    from gcsl.experiments.runner import stage_paths

    metric = cfg.primary_metric
    results: dict[str, Any] = {}
    for v in variants:
        for goal in v.goals:
            seeds, per_seed_value, per_seed_units = [], {}, {}
            for seed in v.seeds:
                m = _load(stage_paths(cfg.out, v.name, seed, goal)["metrics"])
                if m is None or metric not in m["metrics"]:
                    continue
                seeds.append(seed)
                per_seed_value[seed] = float(m["metrics"][metric])
                per_seed_units[seed] = m.get("unit_scores", {}).get(metric, {})
            if not seeds:
                continue
            units = _unit_means(list(per_seed_units.values()))
            ci = mean_ci(list(units.values()), n_boot=cfg.ci_samples, seed=0) if units else None
            results.setdefault(v.name, {"method": v.method, "goals": {}})["goals"][goal] = {
                "seeds": seeds, "per_seed": per_seed_value, "units": units, "per_seed_units": per_seed_units,
                "mean": ci.mean if ci else float(np.mean(list(per_seed_value.values()))),
                "low": ci.low if ci else None, "high": ci.high if ci else None, "n_units": len(units),
            }
    return results


def _fmt(x: float | None, nd: int = 3) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def write_report(cfg, variants) -> Path:
    from gcsl.experiments.plots import plot_bars, plot_goal_curve, plot_histogram

    out = Path(cfg.out)
    metric = cfg.primary_metric
    results = collect_results(cfg, variants)
    base = results.get(cfg.baseline, {}).get("goals", {}).get("top")
    rows = []
    for name, r in results.items():
        top = r["goals"].get("top")
        if top is None:
            continue
        row = {"variant": name, "method": r["method"], "metric": metric, "mean": top["mean"], "ci_low": top["low"],
               "ci_high": top["high"], "n_units": top["n_units"], "seeds": " ".join(map(str, top["seeds"])),
               "per_seed": " ".join(_fmt(top["per_seed"][s]) for s in top["seeds"])}
        if base is not None and name != cfg.baseline:
            # Paired over the seeds both runs have: a one-seed variant meets the baseline's same seed.
            shared = [seed for seed in top["seeds"] if seed in base["per_seed"]]
            if shared:
                pb = paired_bootstrap(_unit_means([top["per_seed_units"][seed] for seed in shared]),
                                      _unit_means([base["per_seed_units"][seed] for seed in shared]),
                                      n_boot=cfg.ci_samples, seed=0)
                tt = paired_ttest({seed: top["per_seed"][seed] for seed in shared},
                                  {seed: base["per_seed"][seed] for seed in shared})
                row |= {"diff_vs_baseline": pb.diff, "diff_low": pb.low, "diff_high": pb.high,
                        "bootstrap_p": pb.p_value, "ttest_p": tt.p_value, "compared_seeds": " ".join(map(str, shared))}
        rows.append(row)

    # The paper's "beyond" check: does the top goal beat the mean score of the top training bin?
    # It needs the evaluation to score generations as the feedback did (higher = better).
    beyond = []
    beyond_applies = (cfg.task, metric) in _FEEDBACK_SCALE_METRICS
    for name, r in results.items() if beyond_applies else ():
        goals_file = out / "runs" / name / "prepared" / "goals.json"
        g = _load(goals_file) if goals_file.exists() else None
        top = r["goals"].get("top")
        if g and top and g.get("top_bin_mean") is not None and r["method"] != "base":
            beyond.append({"variant": name, "top_goal_mean": top["mean"], "ci_low": top["low"], "ci_high": top["high"],
                           "top_training_bin_mean": g["top_bin_mean"],
                           "exceeds": bool(top["low"] is not None and top["low"] > g["top_bin_mean"]),
                           "mean_exceeds": bool(top["mean"] > g["top_bin_mean"])})

    fieldnames = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_json(out / "results.json", {"metric": metric, "baseline": cfg.baseline, "rows": rows,
                                             "beyond_check": beyond,
                                             "goal_curves": {n: {g: {k: v for k, v in d.items() if k not in _UNIT_KEYS}
                                                                 for g, d in r["goals"].items()}
                                                             for n, r in results.items()}})
    plots = []
    for fn, args in ((plot_bars, (rows, metric)), (plot_goal_curve, (cfg, results)), (plot_histogram, (cfg, variants))):
        path = fn(out, *args)
        if path is not None:
            plots.append(path)

    lines = [f"# {cfg.name}", "",
             f"Task `{cfg.task}`, base model `{cfg.model}`, evaluation prompts `{cfg.eval_prompts}`, "
             f"training feedback `{cfg.data}`.",
             f"Metric `{metric}` at the top goal: mean over evaluation units (prompts) of each unit's score "
             f"averaged over seeds, with a 95% bootstrap interval ({cfg.ci_samples} resamples); n = units. "
             f"Differences vs `{cfg.baseline}`, over the seeds both have (marked where fewer than the variant's): "
             "paired bootstrap over shared units, and a paired t-test over those seeds (NaN where fewer than 2).", "",
             "| variant | seeds | n | mean | 95% CI | per seed | diff vs baseline [95% CI] | bootstrap p | t-test p |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = (f"{_fmt(r['diff_vs_baseline'])} [{_fmt(r['diff_low'])}, {_fmt(r['diff_high'])}]"
                if "diff_vs_baseline" in r else "(baseline)" if r["variant"] == cfg.baseline else "—")
        if "compared_seeds" in r and r["compared_seeds"] != r["seeds"]:
            diff += f" (seeds {r['compared_seeds']})"
        lines.append(f"| {r['variant']} | {r['seeds']} | {r['n_units']} | {_fmt(r['mean'])} | "
                     f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] | {r['per_seed']} | {diff} | "
                     f"{_fmt(r.get('bootstrap_p'))} | {_fmt(r.get('ttest_p'))} |")
    if beyond:
        lines += ["", "## Beyond the top training bin?", "",
                  "| variant | top-goal mean [95% CI] | top training bin mean | interval above it |", "|---|---|---|---|"]
        lines += [f"| {b['variant']} | {_fmt(b['top_goal_mean'])} [{_fmt(b['ci_low'])}, {_fmt(b['ci_high'])}] | "
                  f"{_fmt(b['top_training_bin_mean'])} | {'yes' if b['exceeds'] else 'no'} |" for b in beyond]
        lines += ["", "The top training bin's mean is over the training feedback log's responses (other prompts), "
                  "as in the paper's comparison."]
    elif not beyond_applies:
        lines += ["", f"Beyond the top training bin: not applicable here; `{metric}` does not score generations on "
                  "the training feedback's scale."]
    curves = {n: r for n, r in results.items() if len(r["goals"]) > 1}
    if curves:
        lines += ["", "## Goal following", "", "| variant | goal | n | mean [95% CI] |", "|---|---|---|---|"]
        for n, r in curves.items():
            for g, d in r["goals"].items():
                lines.append(f"| {n} | {g} | {d['n_units']} | {_fmt(d['mean'])} [{_fmt(d['low'])}, {_fmt(d['high'])}] |")
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "Reproduce: `gcsl experiment --config <this config>` (resolved config in experiment.json)."]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report


def _save_fig(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path
