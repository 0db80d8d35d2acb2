"""`gcsl experiment`: methods x seeds, each run prepare -> train -> generate -> evaluate, then a report.

Every stage writes its output atomically (or resumably), so a re-run skips finished stages,
resumes an interrupted training or generation, and redoes nothing else. Layout under ``out``::

    runs/<variant>/prepared/                 gcsl prepare output (shared by the seeds)
    runs/<variant>/seed<k>/model/            gcsl train output
    runs/<variant>/seed<k>/gens-<goal>.jsonl gcsl generate output, one file per goal request
    runs/<variant>/seed<k>/metrics-<goal>.json
    report.md, results.csv, results.json, *.png, experiment.json (resolved config + versions)
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gcsl.config import config_to_dict, field, resolve_config
from gcsl.errors import ConfigError
from gcsl.runinfo import atomic_write_json, package_versions

__all__ = ["ExperimentConfig", "Variant", "run_experiment", "expand_variants", "stage_paths"]

Task = Literal["sentiment", "toxicity", "code", "recommendation"]


@dataclass
class Variant:
    """One trained (or base) configuration: a method plus overrides of the shared stage options."""

    name: str
    method: str
    prepare: dict[str, Any]
    train: dict[str, Any]
    generate: dict[str, Any]
    seeds: list[int]
    goals: list[str]


@dataclass
class ExperimentConfig:
    name: str = field(help="experiment name (report title)")
    out: Path = field(help="experiment directory (runs/, report.md, tables, plots)")
    task: Task = field(help="evaluation task")
    data: str = field(help="feedback log for `gcsl prepare` (JSONL/CSV/Parquet/dataset)")
    eval_prompts: str = field(help="prompts JSONL for `gcsl generate` (held out from training)")
    model: str = field("smollm2-135m-instruct", help="base model for every method")
    methods: list[str] = field(default_factory=lambda: ["base", "sft", "gcsl", "gcsl-bey-nl"],
                               help="methods to run with the shared options ('base' = the untrained model)")
    variants: list[dict] = field(default_factory=list, cli=False,
                                 help="extra named variants: {name, method, prepare: {...}, train: {...}, seeds, goals}")
    sweeps: list[dict] = field(default_factory=list, cli=False,
                               help="ablation sweeps: {method, option: 'prepare.bins', values: [3, 5, 7]} -> one "
                                    "variant per value")
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], help="seeds for every method")
    method_seeds: dict = field(default_factory=dict, cli=False, help="per-method seed lists overriding --seeds")
    baseline: str = field("sft", help="variant the others are tested against")
    primary_metric: str = field("mean_score", help="metric used for comparisons and plots")
    goal_curve: list[str] = field(default_factory=list,
                                  help="extra goal requests (e.g. scale:1.08, 0.6) for the goal-following curve")
    goal_curve_methods: list[str] = field(default_factory=lambda: ["gcsl-bey-nl"],
                                          help="variants generated at the goal_curve goals")
    prepare: dict = field(default_factory=dict, cli=False, help="PrepareConfig options shared by all variants")
    train: dict = field(default_factory=dict, cli=False, help="TrainConfig options shared by all variants")
    generate: dict = field(default_factory=dict, cli=False, help="GenerateConfig options shared by all variants")
    evaluate: dict = field(default_factory=dict, cli=False, help="task evaluator options")
    ci_samples: int = field(10_000, help="bootstrap resamples per interval")
    only: list[str] = field(default_factory=list, help="run only these variants (the report still uses all finished)")

    def validate(self) -> list[str]:
        problems = []
        from gcsl.goals import METHODS

        for m in self.methods:
            if m != "base" and m not in METHODS:
                problems.append(f"methods: unknown method {m!r} (known: base, {', '.join(METHODS)})")
        if not self.seeds:
            problems.append("seeds: give at least one seed")
        for s in self.sweeps:
            if not {"method", "option", "values"} <= set(s):
                problems.append("sweeps: each sweep needs method, option (e.g. prepare.bins) and values")
            elif s["option"].split(".")[0] not in ("prepare", "train", "generate"):
                problems.append(f"sweeps: option {s['option']!r} must start with prepare., train. or generate.")
        problems.extend(self._stage_option_problems())
        return problems

    def _stage_option_problems(self) -> list[str]:
        """Unknown stage options are caught here, before hours of training, not when a stage starts."""
        import dataclasses

        from gcsl.data.prepare import PrepareConfig
        from gcsl.evaluation import task_config_class
        from gcsl.generation.generate import GenerateConfig
        from gcsl.training.train import TrainConfig

        problems = []
        stages = {"prepare": PrepareConfig, "train": TrainConfig, "generate": GenerateConfig}
        sources = [("", self.__dict__)] + [(f"variants[{v.get('name')}].", v) for v in self.variants]
        for where, holder in sources:
            for stage, cls in stages.items():
                known = {f.name for f in dataclasses.fields(cls)}
                for key in holder.get(stage, {}) or {}:
                    if key not in known:
                        problems.append(f"{where}{stage}.{key}: unknown option of {cls.__name__}")
        for s in self.sweeps:
            stage, _, key = str(s.get("option", "")).partition(".")
            if stage in stages and key not in {f.name for f in dataclasses.fields(stages[stage])}:
                problems.append(f"sweeps: {s['option']} is not an option of {stages[stage].__name__}")
        try:
            _, task_cls = task_config_class(self.task)
            resolve_config(task_cls, overrides=dict(self.evaluate))
        except ConfigError as exc:
            problems.append(f"evaluate: {exc}")
        return problems


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


def expand_variants(cfg: ExperimentConfig) -> list[Variant]:
    """The experiment's variants: one per method, one per extra variant, one per sweep value."""
    def seeds_for(name: str, method: str) -> list[int]:
        return list(cfg.method_seeds.get(name, cfg.method_seeds.get(method, cfg.seeds)))

    def goals_for(name: str, method: str) -> list[str]:
        return ["top", *cfg.goal_curve] if name in cfg.goal_curve_methods or method in cfg.goal_curve_methods \
            else ["top"]

    out = [Variant(m, m, {}, {}, {}, seeds_for(m, m), goals_for(m, m)) for m in cfg.methods]
    for v in cfg.variants:
        name, method = v["name"], v.get("method", v["name"])
        out.append(Variant(name, method, dict(v.get("prepare", {})), dict(v.get("train", {})),
                           dict(v.get("generate", {})), list(v.get("seeds", seeds_for(name, method))),
                           list(v.get("goals", goals_for(name, method)))))
    for s in cfg.sweeps:
        stage, key = s["option"].split(".", 1)
        for value in s["values"]:
            name = f"{s['method']}[{key}={value}]"
            over = {"prepare": {}, "train": {}, "generate": {}}
            over[stage][key] = value
            out.append(Variant(name, s["method"], over["prepare"], over["train"], over["generate"],
                               list(s.get("seeds", seeds_for(name, s["method"]))), ["top"]))
    names = [v.name for v in out]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"variants: duplicate names {', '.join(sorted(dupes))}; give each variant a unique name")
    return out


def stage_paths(root: Path, variant: str, seed: int, goal: str = "top") -> dict[str, Path]:
    base = Path(root) / "runs" / _slug(variant)
    run = base / f"seed{seed}"
    return {"prepared": base / "prepared", "model": run / "model", "gens": run / f"gens-{_slug(goal)}.jsonl",
            "metrics": run / f"metrics-{_slug(goal)}.json"}


def _say(msg: str) -> None:
    print(f"[gcsl experiment {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_experiment(cfg: ExperimentConfig) -> Path:
    """Runs every variant x seed through the four stages (skipping finished ones) and writes the report."""
    from gcsl.data.prepare import PrepareConfig, prepare
    from gcsl.evaluation import EvaluateConfig, evaluate
    from gcsl.experiments.report import write_report
    from gcsl.generation.generate import GenerateConfig, generate
    from gcsl.training.train import TrainConfig, train

    variants = expand_variants(cfg)
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "experiment.json", {"config": config_to_dict(cfg), "versions": package_versions(),
                                                 "variants": [v.__dict__ for v in variants]})
    todo = [v for v in variants if not cfg.only or v.name in cfg.only]
    # Seed-major order: every variant's first seed finishes before any second seed starts, so a
    # run cut short still has a complete comparison.
    jobs = sorted(((seed, i, v) for i, v in enumerate(todo) for seed in v.seeds), key=lambda j: (j[0], j[1]))
    for n, (seed, _, v) in enumerate(jobs, 1):
        _say(f"({n}/{len(jobs)}) {v.name}, seed {seed}")
        paths = stage_paths(root, v.name, seed)
        model = cfg.model
        if v.method != "base":
            if not (paths["prepared"] / "goals.json").exists():
                _say(f"  prepare {v.method} -> {paths['prepared']}")
                prepare(resolve_config(PrepareConfig, overrides={
                    **cfg.prepare, **v.prepare, "data": cfg.data, "method": v.method,
                    "out": paths["prepared"], "overwrite": True}))
            if not (paths["model"] / "run.json").exists():
                _say(f"  train -> {paths['model']}")
                partial = paths["model"].with_name(paths["model"].name + ".partial")
                train(resolve_config(TrainConfig, overrides={
                    **cfg.train, **v.train, "data": paths["prepared"], "model": cfg.model, "seed": seed,
                    "out": paths["model"], "resume": partial.exists()}))
            model = str(paths["model"])
        for goal in v.goals:
            p = stage_paths(root, v.name, seed, goal)
            if not p["metrics"].exists():
                _say(f"  generate at goal {goal} -> {p['gens'].name}")
                generate(resolve_config(GenerateConfig, overrides={
                    **cfg.generate, **v.generate, "model": model, "prompts": cfg.eval_prompts,
                    "goal": goal, "seed": seed, "out": p["gens"]}))
                _say(f"  evaluate -> {p['metrics'].name}")
                evaluate(resolve_config(EvaluateConfig, overrides={
                    "task": cfg.task, "generations": p["gens"], "out": p["metrics"],
                    "task_options": cfg.evaluate, "ci_samples": cfg.ci_samples, "overwrite": True}))
    report = write_report(cfg, variants)
    _say(f"report: {report}")
    return report
