"""The experiment report: tables with intervals and paired tests, and the plots."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from gcsl.experiments.layout import (
    EXPERT_ROLES,
    ExperimentLayout,
    configured_aspects,
    display_path,
    is_multi_aspect,
    read_json,
    slug,
)
from gcsl.metrics.stats import holm_adjust, mean_ci, paired_bootstrap, paired_ttest
from gcsl.runinfo import atomic_write_json, atomic_write_text

__all__ = ["write_report", "collect_results", "curve_statistics", "training_facts", "requested_goals",
           "aspect_metric_problems", "aspect_grids", "loop_rounds"]


# Per-unit scores stay out of results.json's goal curves (one value per prompt each).
_UNIT_KEYS = ("units", "per_seed_units")


def _unit_means(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """Each unit's score averaged over the seeds that have it (the unit of resampling is the prompt)."""
    acc: dict[str, list[float]] = {}
    for scores in per_seed:
        for unit, v in scores.items():
            if v is not None and np.isfinite(v):
                acc.setdefault(unit, []).append(float(v))
    return {u: float(np.mean(v)) for u, v in acc.items()}


def collect_results(cfg, variants, metric: str | None = None) -> dict[str, Any]:
    """Per variant and goal: per-seed metrics, unit scores pooled over seeds, interval, n.

    ``metric`` defaults to the primary one; check metrics (a second scorer) are collected the same way.
    """
    layout = ExperimentLayout(cfg.out)
    metric = metric or cfg.primary_metric
    results: dict[str, Any] = {}
    for v in variants:
        for goal in layout.variant_goals(v):
            seeds, per_seed_value, per_seed_units = [], {}, {}
            for seed in v.seeds:
                m = layout.metrics(v.name, seed, goal)
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


def _comparison_rows(cfg, results: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    """One row per variant at the top goal, with its difference from the baseline."""
    base = results.get(cfg.baseline, {}).get("goals", {}).get("top")
    rows = []
    for name, r in results.items():
        top = r["goals"].get("top")
        if top is None:
            continue
        row = {"variant": name, "method": r["method"], "metric": metric, "mean": top["mean"], "ci_low": top["low"],
               "ci_high": top["high"], "n_units": top["n_units"], "seeds": " ".join(map(str, top["seeds"])),
               "per_seed": " ".join(_fmt(top["per_seed"][s]) for s in top["seeds"])}
        if base is not None and name != cfg.baseline and (d := _paired_difference(cfg, top, base)) is not None:
            row |= {"diff_vs_baseline": d["diff"], "diff_low": d["low"], "diff_high": d["high"],
                    "bootstrap_p": d["bootstrap_p"], "ttest_p": d["ttest_p"], "compared_seeds": d["seeds"]}
        rows.append(row)
    # Every variant is tested against the one baseline: with ten of them, one p < 0.05 in the table is likely by
    # chance alone. Holm's adjustment over the table's bootstrap p-values keeps that chance at the level.
    compared = [r for r in rows if "bootstrap_p" in r]
    for r, adjusted in zip(compared, holm_adjust([r["bootstrap_p"] for r in compared]), strict=True):
        r["holm_p"] = adjusted
    return rows


def _paired_difference(cfg, top: dict[str, Any], other: dict[str, Any]) -> dict[str, Any] | None:
    """``top`` minus ``other`` (two variants' results at one goal), paired over the seeds both have (a one-seed
    variant meets the other's same seed): bootstrap over shared units, t-test over those seeds; None without one."""
    shared = [seed for seed in top["seeds"] if seed in other["per_seed"]]
    if not shared:
        return None
    pb = paired_bootstrap(_unit_means([top["per_seed_units"][seed] for seed in shared]),
                          _unit_means([other["per_seed_units"][seed] for seed in shared]),
                          n_boot=cfg.ci_samples, seed=0)
    tt = paired_ttest({seed: top["per_seed"][seed] for seed in shared},
                      {seed: other["per_seed"][seed] for seed in shared})
    return {"diff": pb.diff, "low": pb.low, "high": pb.high, "bootstrap_p": pb.p_value, "ttest_p": tt.p_value,
            "seeds": " ".join(map(str, shared))}


def _further_comparisons(cfg, by_metric: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The configured ``comparisons`` ([a, b]: a minus b at the top goal) under every metric, where both have run."""
    rows = []
    for a, b in cfg.comparisons:
        for metric, results in by_metric.items():
            tops = [results.get(name, {}).get("goals", {}).get("top") for name in (a, b)]
            if None not in tops and (d := _paired_difference(cfg, *tops)) is not None:
                rows.append({"variant": a, "against": b, "metric": metric, **d})
    return rows


def _table_lines(cfg, rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| variant | seeds | n | mean | 95% CI | per seed | diff vs baseline [95% CI] | bootstrap p | Holm p | "
             "t-test p |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = (f"{_fmt(r['diff_vs_baseline'])} [{_fmt(r['diff_low'])}, {_fmt(r['diff_high'])}]"
                if "diff_vs_baseline" in r else "(baseline)" if r["variant"] == cfg.baseline else "—")
        if "compared_seeds" in r and r["compared_seeds"] != r["seeds"]:
            diff += f" (seeds {r['compared_seeds']})"
        lines.append(f"| {r['variant']} | {r['seeds']} | {r['n_units']} | {_fmt(r['mean'])} | "
                     f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] | {r['per_seed']} | {diff} | "
                     f"{_fmt(r.get('bootstrap_p'))} | {_fmt(r.get('holm_p'))} | {_fmt(r.get('ttest_p'))} |")
    return lines


# -- training facts ----------------------------------------------------------------------------

TRAIN_FACTS = ("train_rows", "epochs", "optimizer_steps", "train_tokens", "train_seconds", "rows_per_step")


def training_facts(model_dir: Path) -> dict[str, Any] | None:
    """What one finished training run did: rows, epochs, optimizer steps, tokens, seconds, rows per step.

    Read from train_metrics.json; runs made before it held these keys fall back to run.json
    (rows) and trainer_state.json (epoch, global step, token count, train_runtime). A fact
    nowhere to be found is None. None for a run that has not finished.
    """
    run = read_json(Path(model_dir) / "run.json")
    if run is None:
        return None
    metrics = read_json(Path(model_dir) / "train_metrics.json") or {}
    state = read_json(Path(model_dir) / "trainer_state.json") or {}
    summary = next((h for h in reversed(state.get("log_history") or []) if "train_runtime" in h), {})
    fallback = {"train_rows": run.get("rows"), "epochs": state.get("epoch"),
                "optimizer_steps": metrics.get("global_step", state.get("global_step")),
                # the trainer leaves 0 here when it was not asked to count tokens
                "train_tokens": state.get("num_input_tokens_seen") or None,
                "train_seconds": summary.get("train_runtime"), "rows_per_step": None}
    return {k: metrics.get(k, fallback[k]) for k in TRAIN_FACTS}


def loop_training_facts(model_dir: Path) -> dict[str, Any] | None:
    """An online loop's training facts, over all its rounds (rounds.json in its final model folder): rows,
    epochs, optimizer steps, tokens and seconds summed (tokens n/a when a round did not count them), rows per
    step the last round's; None for a loop that has not finished."""
    from gcsl.training.online_loop import read_rounds

    if read_json(Path(model_dir) / "run.json") is None:
        return None
    rounds = read_rounds(model_dir)
    last = training_facts(model_dir)
    return _summed_facts(rounds, last) if rounds else last


def recipe_training_facts(model_dir: Path) -> dict[str, Any] | None:
    """A recommendation recipe's training facts (RosePO, SPRec), over every stage that trained (stages.json's
    records in its run.json): rows, epochs, optimizer steps, tokens and seconds summed, a stage taken from another
    recipe (``shared_from``) counted with its own training's, since the method alone costs that; the sampling
    stages' seconds are not training and stay in run.json's ``compute``. None for a recipe that has not finished."""
    run = read_json(Path(model_dir) / "run.json")
    if run is None:
        return None
    trained = [s for s in run.get("stages") or [] if s.get("kind") in ("sft", "dpo") and s.get("optimizer_steps")]
    return _summed_facts(trained, training_facts(model_dir)) if trained else training_facts(model_dir)


def _summed_facts(parts: list[dict[str, Any]], last: dict[str, Any] | None) -> dict[str, Any]:
    """Facts summed over training parts (a loop's rounds, a recipe's stages); n/a when a part lacks one; rows per
    step the last training's."""

    def total(key: str) -> float | None:
        values = [part.get(key) for part in parts]
        return None if any(x is None for x in values) else round(sum(values), 4)

    return {**{k: total(k) for k in TRAIN_FACTS if k != "rows_per_step"},
            "rows_per_step": (last or {}).get("rows_per_step")}


def _erase_facts(model_dir: Path) -> dict[str, Any] | None:
    """An unlearning variant's erase step as a training row: the rows it erased and its seconds (one parameter
    update, no epochs or optimizer steps); None before it has run."""
    run = read_json(Path(model_dir) / "run.json")
    if run is None:
        return None
    return {**dict.fromkeys(TRAIN_FACTS), "train_rows": run.get("erased_rows"), "train_seconds": run.get("erase_seconds")}


def _training_table(cfg, variants) -> list[dict[str, Any]]:
    from gcsl.methods import get_method

    layout = ExperimentLayout(cfg.out)
    out = []
    for v in variants:
        kind = get_method(v.method).variant_kind
        # An online loop's row sums its rounds, a recipe's its stages.
        read = {"loop": loop_training_facts, "recipe": recipe_training_facts}.get(kind, training_facts)
        # A decoding-time variant trained its adapters (expert, anti-expert), listed one row each.
        if kind == "decoding":
            models = {f"{v.name} ({role})": ({seed: layout.expert(v.name, role, seed).model for seed in v.seeds}, read)
                      for role in EXPERT_ROLES}
        # An unlearning variant: the adapter it erased from (its own, or the experiment's variant it reused), then
        # the erase step.
        elif kind == "erased":
            full_method = get_method(v.method).erases[0]
            own = {seed: layout.stage(v.name, seed).model.with_name("full") for seed in v.seeds}
            full = {seed: folder if (layout.found(folder) / "run.json").is_file()
                    else layout.stage(full_method, seed).model for seed, folder in own.items()}
            models = {f"{v.name} ({full_method} adapter)": (full, read),
                      f"{v.name} (erase)": ({seed: layout.stage(v.name, seed).model for seed in v.seeds}, _erase_facts)}
        else:
            models = {v.name: ({seed: layout.stage(v.name, seed).model for seed in v.seeds}, read)}
        for name, (model_dirs, read) in models.items():
            facts = {seed: read(layout.found(folder)) for seed, folder in model_dirs.items()}
            facts = {seed: f for seed, f in facts.items() if f is not None}
            if not facts:  # the base model and variants not trained yet
                continue
            out.append({"variant": name, "method": v.method, "seeds": sorted(facts),
                        **{k: [facts[seed][k] for seed in sorted(facts)] for k in TRAIN_FACTS}})
    return out


# -- online loop rounds ------------------------------------------------------------------------

# rounds.json's facts shown per round (gcsl.training.online_loop.ROUND_FACTS), in the table's order.
LOOP_ROUND_FACTS = ("pool_rows", "samples", "mean_sample_score", "retained_levels", "optimizer_steps",
                    "train_seconds", "scorer_calls")


def loop_rounds(cfg, variants) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every loop variant's rounds, one row per (seed, round) from its final model's rounds.json, and per variant
    the change in the samples' mean score from round 1 (the first that samples) to the last round over seeds.

    ``thresholds`` and ``top_threshold`` (the highest level's) are in the metric's own units, as goals state them
    and the samples' mean score is; a rounds.json written before it recorded those gives its oriented ones
    (larger is better), flagged by ``oriented``. The change's interval is a bootstrap over the seeds' changes,
    None with fewer than 2 seeds.
    """
    from gcsl.methods import get_method
    from gcsl.training.online_loop import read_rounds

    layout = ExperimentLayout(cfg.out)
    rows, changes = [], []
    for v in variants:
        if get_method(v.method).variant_kind != "loop":
            continue
        deltas = {}
        for seed in v.seeds:
            rounds = read_rounds(layout.found(layout.stage(v.name, seed).model)) or []
            for r in rounds:
                oriented = r.get("thresholds_display") is None
                thresholds = (r.get("thresholds") if oriented else r["thresholds_display"]) or []
                rows.append({"variant": v.name, "seed": seed, "round": r["round"],
                             **{k: r.get(k) for k in LOOP_ROUND_FACTS}, "thresholds": thresholds,
                             "oriented": oriented, "top_threshold": thresholds[-1] if thresholds else None})
            by_round = {r["round"]: r.get("mean_sample_score") for r in rounds}
            last = max(by_round, default=0)
            if last >= 1 and by_round.get(1) is not None and by_round[last] is not None:
                deltas[seed] = by_round[last] - by_round[1]
        if deltas:
            ci = mean_ci(list(deltas.values()), n_boot=cfg.ci_samples, seed=0) if len(deltas) >= 2 else None
            changes.append({"variant": v.name, "seeds": sorted(deltas), "n_seeds": len(deltas),
                            "per_seed": deltas, "mean_change": float(np.mean(list(deltas.values()))),
                            "ci_low": ci.low if ci else None, "ci_high": ci.high if ci else None})
    return rows, changes


def _loop_round_lines(rows: list[dict[str, Any]], changes: list[dict[str, Any]], plot: Path | None) -> list[str]:
    lines = ["", "## Online loop rounds", "",
             "One row per loop seed and round (rounds.json beside its final model): the pool's rows, the samples "
             "the previous round's model drew and the scorer scored (round 0 trains on the log: none), their mean "
             "score, the re-quantized thresholds (in the metric's units, as the goals state them; top = the highest "
             "level's; marked (oriented) where an older rounds.json recorded only oriented ones), the "
             "levels retained as goals, and the round's optimizer steps and training time.", "",
             "| variant | seed | round | pool rows | samples | mean sample score | top threshold | thresholds | "
             "retained levels | optimizer steps | training time | scorer calls |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['round']} | {_fmt_fact([r['pool_rows']], 'pool_rows')} | "
                     f"{_fmt_fact([r['samples']], 'samples')} | {_fmt(r['mean_sample_score'])} | "
                     f"{_fmt(r['top_threshold'])} | {' '.join(_fmt(t) for t in r['thresholds'] or []) or 'n/a'}"
                     f"{' (oriented)' if r['oriented'] and r['thresholds'] else ''} | "
                     f"{' '.join(map(str, r['retained_levels'] or [])) or 'n/a'} | "
                     + " | ".join(_fmt_fact([r[k]], k) for k in ("optimizer_steps", "train_seconds", "scorer_calls"))
                     + " |")
    lines.append("")
    for c in changes:
        interval = (f", 95% bootstrap interval over seeds [{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}]"
                    if c["ci_low"] is not None else "; no interval with fewer than 2 seeds")
        lines.append(f"- {c['variant']}: mean sample score changed by {c['mean_change']:+.3f} from round 1 to the "
                     f"last round, averaged over n = {c['n_seeds']} seed{'s' if c['n_seeds'] != 1 else ''}{interval}.")
    if plot is not None:
        lines += ["", f"![{plot.stem}]({plot.name})"]
    return lines


def _fmt_fact(values: list[Any], key: str) -> str:
    """One value when every seed agrees, else the per-seed values; n/a where a run does not say."""
    def one(x: Any) -> str:
        if x is None or (isinstance(x, float) and not np.isfinite(x)):
            return "n/a"
        if key == "train_seconds":
            return f"{float(x):.1f} s" if float(x) < 60 else f"{float(x) / 60:.1f} min"
        if key in ("epochs", "rows_per_step") and not float(x).is_integer():
            return f"{float(x):.2f}"
        return f"{int(x):,}" if key == "train_tokens" else str(int(x)) if float(x).is_integer() else str(x)

    shown = [one(x) for x in values]
    return shown[0] if len(set(shown)) == 1 else " / ".join(shown)


# -- goal-following curves ---------------------------------------------------------------------

def requested_goals(cfg, v, goals: list[str]) -> dict[str, float | None]:
    """Each goal request as the threshold or value it asks for, in the metric's units (None if unknown).

    Goal-free variants, or a variant not yet prepared, have no requested values: the curve then
    falls back to the order the goals were configured in.
    """
    from gcsl.errors import ConfigError
    from gcsl.goals import inference_goal

    setup = ExperimentLayout(cfg.out).goal_setup(v.name)
    if setup is None:
        return {g: None for g in goals}
    out: dict[str, float | None] = {}
    for g in goals:
        try:
            goal = inference_goal(setup, g)
        except ConfigError:
            out[g] = None
            continue
        out[g] = goal.threshold if goal.threshold is not None else goal.value
    return out


def curve_statistics(points: dict[str, dict[str, Any]], requested: dict[str, float | None], *, n_boot: int,
                     seed: int = 0) -> dict[str, Any]:
    """Does the achieved score follow the requested goal? Spearman's rho and top minus bottom.

    ``points[goal]`` is a :func:`collect_results` entry (``mean``, ``seeds``, ``per_seed_units``);
    ``requested[goal]`` the value the goal asks for. Goals are ordered by requested value (by
    their given order when any value is unknown). ``spearman_rho`` ranks the requested values
    against the achieved means (ties share ranks; NaN when either side is constant).
    ``top_minus_bottom`` is the highest requested goal's score minus the lowest's, paired over
    the prompts and the seeds both have (each prompt's score averaged over those seeds, as in
    the method comparison), with a paired bootstrap interval and p-value.
    """
    goals = [g for g in requested if g in points]
    xs = [requested[g] for g in goals]
    if any(x is None for x in xs):
        xs = [float(i) for i in range(len(goals))]
    order = sorted(range(len(goals)), key=lambda i: (xs[i], i))
    goals, xs = [goals[i] for i in order], [float(xs[i]) for i in order]
    means = [float(points[g]["mean"]) for g in goals]
    out: dict[str, Any] = {"goals": goals, "requested": xs, "means": means, "n_goals": len(goals),
                           "spearman_rho": None, "spearman_p": None, "top_goal": None, "bottom_goal": None}
    if len(goals) >= 2 and np.ptp(xs) > 0 and np.ptp(means) > 0:
        from scipy.stats import spearmanr

        res = spearmanr(xs, means)
        out["spearman_rho"], out["spearman_p"] = float(res.statistic), float(res.pvalue)
    if len(goals) >= 2 and xs[-1] > xs[0]:
        top, bottom = points[goals[-1]], points[goals[0]]
        shared = [s for s in top["seeds"] if s in bottom["seeds"]]
        if shared:
            pb = paired_bootstrap(_unit_means([top["per_seed_units"][s] for s in shared]),
                                  _unit_means([bottom["per_seed_units"][s] for s in shared]), n_boot=n_boot, seed=seed)
            out |= {"top_goal": goals[-1], "bottom_goal": goals[0], "top_minus_bottom": pb.diff, "diff_low": pb.low,
                    "diff_high": pb.high, "diff_p": pb.p_value, "n_units": pb.n, "seeds": shared}
    return out


def _curves(cfg, variants, by_metric: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per curve variant: its goals in order, each point under every metric, and the statistics per metric."""
    layout = ExperimentLayout(cfg.out)
    out = {}
    for v in variants:
        goals = layout.curve_goals(v)
        if len(goals) < 2 or is_multi_aspect(layout.goal_setup(v.name)):  # those have a goal grid
            continue
        requested = requested_goals(cfg, v, goals)
        stats = {m: curve_statistics(res.get(v.name, {}).get("goals", {}), requested, n_boot=cfg.ci_samples)
                 for m, res in by_metric.items()}
        if not any(st["n_goals"] for st in stats.values()):
            continue
        points = {g: {m: {k: res[v.name]["goals"][g][k] for k in ("mean", "low", "high", "n_units", "seeds")}
                      for m, res in by_metric.items() if g in res.get(v.name, {}).get("goals", {})}
                  for g in goals}
        out[v.name] = {"method": v.method, "requested": requested, "points": points, "statistics": stats}
    return out


def _curve_lines(cfg, curves: dict[str, Any], metrics: list[str]) -> list[str]:
    lines = ["", "## Goal following", "",
             "Each curve's goals in increasing order of what they request (the goal's threshold or value in "
             "the training metric's units; `level:K` is level K's goal exactly as trained). Spearman's rho "
             "ranks requested against achieved means; top minus bottom is the highest requested goal's score "
             "minus the lowest's, paired over prompts and the seeds both have (95% paired bootstrap interval, "
             f"{cfg.ci_samples} resamples). A goal that steers gives rho near 1 and an interval above 0.", "",
             "| variant | metric | goals | Spearman rho | top - bottom [95% CI] | p |", "|---|---|---|---|---|---|"]
    for name, c in curves.items():
        for m in metrics:
            st = c["statistics"].get(m)
            if not st or not st["n_goals"]:
                continue
            diff = (f"{_fmt(st['top_minus_bottom'])} [{_fmt(st['diff_low'])}, {_fmt(st['diff_high'])}] "
                    f"({st['top_goal']} - {st['bottom_goal']})" if st["top_goal"] else "—")
            lines.append(f"| {name} | {m} | {st['n_goals']} | {_fmt(st['spearman_rho'])} | {diff} | "
                         f"{_fmt(st.get('diff_p'))} |")
    lines += ["", "| variant | goal | requested | n | " + " | ".join(f"{m} [95% CI]" for m in metrics) + " |",
              "|---|---|---|---|" + "---|" * len(metrics)]
    for name, c in curves.items():
        order = next((st["goals"] for st in c["statistics"].values() if st["n_goals"]), [])
        for g in order:
            pts = c["points"].get(g, {})
            n = next((p["n_units"] for p in pts.values()), 0)
            cells = [f"{_fmt(pts[m]['mean'])} [{_fmt(pts[m]['low'])}, {_fmt(pts[m]['high'])}]" if m in pts else "—"
                     for m in metrics]
            lines.append(f"| {name} | {g} | {_fmt(c['requested'].get(g))} | {n} | " + " | ".join(cells) + " |")
    return lines


# -- multi-aspect goal grids ---------------------------------------------------------------------

def _listed(metrics: Any) -> list[str]:
    return [metrics] if isinstance(metrics, str) else list(metrics or [])


def aspect_metric_problems(cfg, task) -> list[str]:
    """Problems of ``aspect_metrics``: each key must name an aspect of the prepare blocks, each value
    metrics the task reports (checked before training, as primary and check metrics are)."""
    names = [a.name for a in configured_aspects(cfg)]
    problems = []
    if not isinstance(cfg.aspect_metrics, dict):
        return [f"aspect_metrics: expected a mapping of aspect name to metrics, got {cfg.aspect_metrics!r}"]
    for aspect, metrics in cfg.aspect_metrics.items():
        if aspect not in names:
            problems.append(f"aspect_metrics.{aspect}: no aspect of that name in the prepare blocks' aspects "
                            f"({', '.join(names) or 'none given'}); use an aspect's name")
        if not _listed(metrics):
            problems.append(f"aspect_metrics.{aspect}: give at least one metric of task {cfg.task}")
        problems.extend(f"aspect_metrics.{aspect}: task {cfg.task} does not report {m!r}; choose one of "
                        f"{', '.join(task.metric_names)}" for m in _listed(metrics) if task.metric(m) is None)
    return problems


def _cell_request(setup, goal: str) -> list[Any] | None:
    """Each aspect's resolved goal (level, threshold in display units) of a goal request; None if it has none."""
    from gcsl.errors import ConfigError
    from gcsl.goals import inference_goal
    from gcsl.goals.aspects import split_goal_request

    try:
        return [inference_goal(a, wanted) for a, wanted in zip(setup.aspects, split_goal_request(setup, goal))]
    except ConfigError:
        return None


def _aspect_rho(cells: list[dict[str, Any]], i: int, metric: str, points: dict[str, Any], *,
                n_boot: int) -> list[dict[str, Any]]:
    """Spearman's rho of aspect ``i``'s requested value against ``metric``'s achieved mean: within each group
    of cells that hold the other aspects' levels fixed, then over every cell (pooled)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for c in cells:
        others = [a for j, a in enumerate(c["aspects"]) if j != i]
        fixed = ", ".join(f"{a['name']} level {a['level']}" for a in others)
        groups.setdefault(fixed, []).append(c)
    groups["pooled"] = cells
    out = []
    for fixed, members in groups.items():
        st = curve_statistics({c["goal"]: points[c["goal"]] for c in members if c["goal"] in points},
                              {c["goal"]: c["aspects"][i]["requested"] for c in members}, n_boot=n_boot)
        out.append({"held_fixed": fixed, **{k: st[k] for k in ("n_goals", "spearman_rho", "spearman_p")}})
    return out


def aspect_grids(cfg, variants, by_metric: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per multi-aspect variant: one cell per goal request of its curve (or its top goal), with each aspect's
    requested level and threshold, the training rows of that level combination (0 = never trained) and
    every aspect metric's achieved mean; and per aspect and metric the Spearman rho of the requested value
    against the achieved mean (:func:`curve_statistics`), other aspects held fixed and pooled.

    ``by_metric[m]`` is :func:`collect_results` for metric ``m``.
    """
    layout = ExperimentLayout(cfg.out)
    out = {}
    for v in variants:
        setup = layout.goal_setup(v.name)
        if not is_multi_aspect(setup):
            continue
        cells = []
        for goal in layout.curve_goals(v) or ["top"]:
            parts = _cell_request(setup, goal)
            if parts is None:
                continue
            levels = tuple(g.level for g in parts)
            cells.append({"goal": goal, "train_rows": None if None in levels else setup.combination_counts.get(levels, 0),
                          "aspects": [{"name": n, "level": g.level, "requested": g.threshold}
                                      for n, g in zip(setup.names, parts)],
                          "metrics": {m: {k: res[v.name]["goals"][goal][k] for k in ("mean", "low", "high", "n_units",
                                                                                    "seeds")}
                                      for m, res in by_metric.items() if goal in res.get(v.name, {}).get("goals", {})}})
        rho = {}
        for i, name in enumerate(setup.names):
            for m in _listed(cfg.aspect_metrics.get(name)):
                if len(cells) >= 2 and m in by_metric:
                    rho[f"{name}|{m}"] = {"aspect": name, "metric": m, "groups": _aspect_rho(
                        cells, i, m, by_metric[m].get(v.name, {}).get("goals", {}), n_boot=cfg.ci_samples)}
        out[v.name] = {"method": v.method, "aspects": list(setup.names), "cells": cells,
                       "statistics": list(rho.values())}
    return out


def _grid_lines(cfg, grids: dict[str, Any], metrics: list[str], heatmaps: list[Path]) -> list[str]:
    lines = ["", "## Multi-aspect goals", "",
             "One row per requested goal: each aspect's requested level and threshold, the training rows that "
             "demonstrate that combination of levels (goals.json; **0 = never trained**, the goal combines "
             "aspects the model saw only apart), and each aspect metric's mean over prompts with its 95% "
             f"bootstrap interval ({cfg.ci_samples} resamples; n prompts, seeds). Aspect metrics: "
             + "; ".join(f"{a}: {', '.join(_listed(ms))}" for a, ms in cfg.aspect_metrics.items()) + "."]
    for name, g in grids.items():
        shown = [m for m in metrics if any(m in c["metrics"] for c in g["cells"])]
        lines += ["", f"### {name} ({g['method']})", "",
                  "| goal | " + " | ".join(g["aspects"]) + " | training rows | n | seeds | "
                  + " | ".join(f"{m} [95% CI]" for m in shown) + " |",
                  "|---|" + "---|" * len(g["aspects"]) + "---|---|---|" + "---|" * len(shown)]
        for c in g["cells"]:
            asked = [f"level {a['level']} ({_fmt(a['requested'], 2)})" if a["level"] is not None
                     else _fmt(a["requested"], 2) for a in c["aspects"]]
            rows = ("n/a" if c["train_rows"] is None else
                    "**0 (never trained)**" if c["train_rows"] == 0 else str(c["train_rows"]))
            first = next(iter(c["metrics"].values()), {})
            cells = [f"{_fmt(c['metrics'][m]['mean'])} [{_fmt(c['metrics'][m]['low'])}, "
                     f"{_fmt(c['metrics'][m]['high'])}]" if m in c["metrics"] else "—" for m in shown]
            lines.append(f"| {c['goal']} | " + " | ".join(asked) + f" | {rows} | {first.get('n_units', 0)} | "
                         f"{' '.join(map(str, first.get('seeds', [])))} | " + " | ".join(cells) + " |")
        if g["statistics"]:
            lines += ["", "Does each aspect follow its own request? Spearman's rho of the aspect's requested "
                          "threshold against its metric's achieved mean, within each setting of the other "
                          "aspects and pooled over all goals (— where a side is constant or there are fewer than "
                          "two goals). Thresholds are in each aspect's own units (brevity: words), so a followed request "
                          "gives rho near +1 whichever end is better (asking for fewer words gives fewer).", "",
                      "| aspect | metric | other aspects held at | goals | Spearman rho | p |", "|---|---|---|---|---|---|"]
            lines += [f"| {st['aspect']} | {st['metric']} | {grp['held_fixed'] or '—'} | {grp['n_goals']} | "
                      f"{_fmt(grp['spearman_rho'])} | {_fmt(grp['spearman_p'])} |"
                      for st in g["statistics"] for grp in st["groups"]]
    if heatmaps:
        lines += ["", "Heatmaps (rows: the first aspect's level, columns: the second's; colour and text: the "
                      "achieved mean [95% CI]; a cell marked * was never trained):", ""]
        lines += [f"![{p.stem}]({p.name})" for p in heatmaps]
    return lines


# -- goal-sensitivity probe ----------------------------------------------------------------------

def _probed_aspects(setup) -> list[str | None]:
    """A multi-aspect variant has one probe per aspect, each in a subfolder named after it; others one (None)."""
    return [a.metric.name for a in setup.aspects] if is_multi_aspect(setup) else [None]


def _aspect_folder(folder: Path, aspect: str | None) -> Path:
    return folder if aspect is None else folder / slug(aspect)


def _probes(cfg, variants) -> list[dict[str, Any]]:
    layout = ExperimentLayout(cfg.out)
    out = []
    for v in variants:
        aspects = _probed_aspects(layout.goal_setup(v.name))
        for seed in v.seeds:
            for aspect in aspects:
                folder = _aspect_folder(layout.stage(v.name, seed).probe_out, aspect)
                probe = read_json(folder / "probe.json")
                if probe is None:
                    continue
                heatmap = folder / "probe.png"
                out.append({"variant": v.name, "seed": seed, "aspect": aspect,
                            **{k: probe.get(k) for k in ("sensitivity", "ci_low", "ci_high", "trend", "trend_low",
                                                         "trend_high", "n_rows")},
                            "json": layout.relative(folder / "probe.json"),
                            "heatmap": layout.relative(heatmap) if heatmap.exists() else None})
    return out


def _pooled_probes(cfg, variants) -> list[dict[str, Any]]:
    """Per variant (and aspect) probed on two or more seeds over the same rows in the same bins: each row's gain
    (log p under the highest goal minus under the lowest) averaged over the seeds, then the probe's sensitivity
    and trend on those means, resampling rows, as the results tables pool units over seeds (the seeds' spread is
    not in the interval). Loops re-quantize per seed, so their bins differ and they are not pooled."""
    from gcsl.probe import ProbeConfig, sensitivity, trend
    from gcsl.stages import iter_jsonl

    layout = ExperimentLayout(cfg.out)
    n_boot = int(cfg.probe.get("ci_samples", ProbeConfig.__dataclass_fields__["ci_samples"].default))
    out = []
    for v in variants:
        for aspect in _probed_aspects(layout.goal_setup(v.name)):
            rows = {}
            for seed in v.seeds:
                path = layout.found(_aspect_folder(layout.stage(v.name, seed).probe, aspect) / "rows.jsonl")
                if path.is_file():
                    rows[seed] = [row for _, row in iter_jsonl(path, "probe rows")]
            keys = {tuple((r["row"], r["score"], r["bin"]) for r in seed_rows) for seed_rows in rows.values()}
            if len(rows) < 2 or len(keys) != 1:
                continue
            gains = np.mean([[list(r["logp"].values())[-1] - list(r["logp"].values())[0] for r in seed_rows]
                             for seed_rows in rows.values()], axis=0)
            bins = np.array([r["bin"] for r in next(iter(rows.values()))])
            result = sensitivity(gains, bins, n_boot=n_boot, seed=0)
            slope, low, high = trend(gains, bins, n_boot=n_boot, seed=0)
            out.append({"variant": v.name, "seeds": sorted(rows), "aspect": aspect, "n_rows": int(len(bins)),
                        "sensitivity": result.mean, "ci_low": result.low, "ci_high": result.high,
                        "trend": slope, "trend_low": low, "trend_high": high})
    return out


def _aspect_label(aspect: str | None) -> str:
    return f" ({aspect})" if aspect else ""


def write_report(cfg, variants) -> Path:
    from gcsl.experiments.plots import (
        plot_aspect_heatmaps,
        plot_bars,
        plot_goal_curve,
        plot_histogram,
        plot_loop_rounds,
    )
    from gcsl.tasks import get_task

    layout = ExperimentLayout(cfg.out)
    out = layout.root
    metric = cfg.primary_metric
    metrics = [metric, *[m for m in cfg.check_metrics if m != metric]]
    by_metric = {m: collect_results(cfg, variants, m) for m in metrics}
    results = by_metric[metric]
    rows = _comparison_rows(cfg, results, metric)
    check_rows = {m: _comparison_rows(cfg, by_metric[m], m) for m in metrics[1:]}
    for m, mrows in check_rows.items():  # every results row carries the check scorers' numbers too
        by_name = {r["variant"]: r for r in mrows}
        for row in rows:
            other = by_name.get(row["variant"], {})
            row |= {f"{m}_{k}": other[k] for k in ("mean", "ci_low", "ci_high", "diff_vs_baseline", "diff_low",
                                                    "diff_high", "bootstrap_p", "holm_p", "ttest_p")
                    if k in other}

    # The paper's "beyond" check: does the top goal beat the mean score of the top training bin?
    # It needs the evaluation to score generations as the feedback did (higher = better).
    beyond = []
    task = get_task(cfg.task)
    # Metrics that score generations on the training feedback's own scale (higher = better).
    feedback_scale = {m for m in metrics if (spec := task.metric(m)) is not None and spec.on_feedback_scale}
    beyond_applies = metric in feedback_scale
    for v in variants if beyond_applies else ():
        r = results.get(v.name)
        setup = layout.goal_setup(v.name)  # None for the base model
        top = r["goals"].get("top") if r else None
        # A multi-aspect variant has no one top bin (its aspects' top bins are shown in its goal grid).
        if setup is not None and not is_multi_aspect(setup) and top and setup.top_bin_mean is not None:
            bin_mean = setup.metric.display(setup.top_bin_mean)
            beyond.append({"variant": v.name, "top_goal_mean": top["mean"], "ci_low": top["low"],
                           "ci_high": top["high"], "top_training_bin_mean": bin_mean,
                           "exceeds": bool(top["low"] is not None and top["low"] > bin_mean),
                           "mean_exceeds": bool(top["mean"] > bin_mean)})

    further = _further_comparisons(cfg, by_metric)
    training = _training_table(cfg, variants)
    round_rows, round_changes = loop_rounds(cfg, variants)
    curves = _curves(cfg, variants, by_metric)
    probes = _probes(cfg, variants)
    pooled = _pooled_probes(cfg, variants)
    # Aspect metrics (e.g. words for brevity) are collected like the check metrics, for the goal grids only.
    aspect_metrics = list(dict.fromkeys(m for ms in cfg.aspect_metrics.values() for m in _listed(ms)))
    grids = aspect_grids(cfg, variants, {**by_metric, **{m: collect_results(cfg, variants, m)
                                                         for m in aspect_metrics if m not in by_metric}})

    # Columns in first-seen order: the same header on every run, whichever variant comes first.
    fieldnames = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(layout.results_csv, buf.getvalue())

    def curve_points(name: str, r: dict[str, Any]) -> dict[str, Any]:
        return {g: {**{k: v for k, v in d.items() if k not in _UNIT_KEYS},
                    "check": {m: {k: by_metric[m][name]["goals"][g][k] for k in ("mean", "low", "high", "n_units")}
                              for m in metrics[1:] if g in by_metric[m].get(name, {}).get("goals", {})}}
                for g, d in r["goals"].items()}

    atomic_write_json(layout.results_json, {
        "metric": metric, "check_metrics": metrics[1:], "baseline": cfg.baseline, "rows": rows,
        "check_rows": check_rows, **({"comparisons": further} if cfg.comparisons else {}),
        "beyond_check": beyond, "training": training,
        "goal_curves": {n: curve_points(n, r) for n, r in results.items()},
        "curve_statistics": {n: {"requested": c["requested"], **c["statistics"]} for n, c in curves.items()},
        "probe": probes, "probe_pooled": pooled, **({"aspect_grids": grids} if grids else {}),
        # Only experiments with loop variants carry these keys: other results.json files are unchanged.
        **({"loop_rounds": round_rows, "loop_round_change": round_changes} if round_rows else {})})
    plots = []
    for fn, args in ((plot_bars, (rows, metric)), (plot_goal_curve, (curves, metrics, feedback_scale)),
                     (plot_histogram, (cfg, variants))):
        path = fn(out, *args)
        if path is not None:
            plots.append(path)
    heatmaps = (plot_aspect_heatmaps(out, grids, {a: _listed(ms) for a, ms in cfg.aspect_metrics.items()})
                if grids else [])
    round_plot = plot_loop_rounds(out, round_rows) if round_rows else None

    lines = [f"# {cfg.name}", "",
             f"Task `{cfg.task}`, base model `{cfg.model}`, evaluation prompts `{display_path(cfg.eval_prompts)}`, "
             f"training feedback `{display_path(cfg.data)}`"
             + (f" less {cfg.validation_prompts} validation prompts (`validation.jsonl`, never trained on)."
                if cfg.validation_prompts else "."),
             f"Metric `{metric}` at the top goal: mean over evaluation units (prompts) of each unit's score "
             f"averaged over seeds, with a 95% bootstrap interval ({cfg.ci_samples} resamples); n = units. "
             f"Differences vs `{cfg.baseline}`, over the seeds both have (marked where fewer than the variant's): "
             "paired bootstrap over shared units, and a paired t-test over those seeds (NaN where fewer than 2). "
             "Holm p: the bootstrap p adjusted (Holm) for testing every variant of the table against the baseline; "
             "a difference counts where it is below 0.05.", "",
             *_table_lines(cfg, rows)]
    for m, mrows in check_rows.items():
        lines += ["", f"### Check metric `{m}`", "",
                  "The same generations, scored independently; the same statistics as above.", "",
                  *_table_lines(cfg, mrows)]
    if cfg.comparisons:
        lines += ["", "## Further comparisons", "",
                  "Each configured pair at the top goal: the first variant minus the second, paired over the seeds "
                  "both have, as above; under every metric. A pair not listed has not run yet.", "",
                  "| variant | minus | metric | seeds | difference [95% CI] | bootstrap p | t-test p |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['against']} | {r['metric']} | {r['seeds']} | {_fmt(r['diff'])} "
                  f"[{_fmt(r['low'])}, {_fmt(r['high'])}] | {_fmt(r['bootstrap_p'])} | {_fmt(r['ttest_p'])} |"
                  for r in further]
    if training:
        lines += ["", "## Training", "",
                  "Per variant (one value when every seed agrees, else per seed): training rows in its prepared "
                  "data, epochs over them, optimizer steps, tokens trained on, wall-clock training time, "
                  "rows per optimizer step; n/a where the run did not record it.", "",
                  "| variant | seeds | rows | epochs | optimizer steps | tokens | training time | rows/step |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {t['variant']} | {' '.join(map(str, t['seeds']))} | "
                  + " | ".join(_fmt_fact(t[k], k) for k in TRAIN_FACTS) + " |" for t in training]
        from gcsl.methods import get_method

        erased = sorted({t["variant"].split(" (")[0] for t in training if get_method(t["method"]).erases})
        if erased:
            lines += ["", f"Unlearning variants ({', '.join(erased)}): the adapter each erases from, trained as any "
                          "other, then the erase step: the rows it removes and the seconds of its one influence "
                          "update (the solver's Hessian-vector products and residual are in its run.json)."]
        online = [t["variant"] for t in training if get_method(t["method"]).variant_kind == "online"]
        if online:
            lines += ["", f"Online variants ({', '.join(online)}) train on their own samples: their rows are the "
                          "completions they sampled for the training prompts, each scored once by the task's scorer "
                          "(scorer calls = rows), and rows/step the completions per optimizer step."]
        loops = [t["variant"] for t in training if get_method(t["method"]).variant_kind == "loop"]
        if loops:
            lines += ["", f"Online loop variants ({', '.join(loops)}) sum their rounds' rows, epochs, optimizer "
                          "steps, tokens and training time (sampling and scoring not included; rows/step is the "
                          "last round's); each round's record is in rounds.json beside its model."]
    if round_rows:
        lines += _loop_round_lines(round_rows, round_changes, round_plot)
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
    if curves:
        lines += _curve_lines(cfg, curves, metrics)
    if probes:
        lines += ["", "## Goal sensitivity on the validation prompts", "",
                  "The probe's sensitivity of each trained model to its goal, on the held-out training prompts "
                  "(`validation.jsonl`), with its own bootstrap interval: the top bin minus the bottom bin of the "
                  "highest goal's gain over the lowest goal, and its trend over every row (slope per level), in "
                  "nats per token; the heatmap shows score bin x goal. A multi-aspect variant is probed per aspect: "
                  "that aspect's goal varies, the others ask for their top goal, rows are binned by its column.", "",
                  "| variant | seed | n rows | sensitivity [95% CI] | trend per level [95% CI] | heatmap |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['variant']}{_aspect_label(p['aspect'])} | {p['seed']} | {p['n_rows'] if p['n_rows'] is not None else 'n/a'} | "
                  f"{_fmt(p['sensitivity'], 4)} [{_fmt(p['ci_low'], 4)}, {_fmt(p['ci_high'], 4)}] | "
                  f"{_fmt(p.get('trend'), 4)} [{_fmt(p.get('trend_low'), 4)}, {_fmt(p.get('trend_high'), 4)}] | "
                  + (f"[probe.png]({p['heatmap']})" if p["heatmap"] else "—") + " |" for p in probes]
        lines += [f"| {p['variant']}{_aspect_label(p['aspect'])} | {' '.join(map(str, p['seeds']))} (pooled) | "
                  f"{p['n_rows']} | {_fmt(p['sensitivity'], 4)} [{_fmt(p['ci_low'], 4)}, {_fmt(p['ci_high'], 4)}] | "
                  f"{_fmt(p['trend'], 4)} [{_fmt(p['trend_low'], 4)}, {_fmt(p['trend_high'], 4)}] | — |" for p in pooled]
        if pooled:
            lines += ["", "A pooled row averages each validation row's gain (highest goal minus lowest) over the seeds "
                          "and resamples rows, as the results tables pool prompts over seeds; the seeds' spread is "
                          "not in its interval. Loop variants re-quantize per seed and are not pooled."]
    if grids:
        lines += _grid_lines(cfg, grids, aspect_metrics, heatmaps)
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "Per-generation completions and scores: `items/<variant>/seed<k>/<goal>.jsonl`.",
              "Reproduce: `gcsl experiment --config <this config>` (resolved config in experiment.json)."]
    atomic_write_text(layout.report, "\n".join(lines) + "\n")
    return layout.report
