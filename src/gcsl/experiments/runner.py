"""`gcsl experiment`: methods x seeds, each run prepare -> train -> generate -> evaluate, then a report.

Every stage writes its output atomically (or resumably), so a re-run skips finished stages,
resumes an interrupted training or generation, and redoes nothing else. Every file's place
comes from :class:`gcsl.experiments.layout.ExperimentLayout`, which the report, plots and
quickstart read through too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gcsl.config import config_to_dict, field, resolve_config
from gcsl.errors import ConfigError, StageError
from gcsl.experiments.layout import (
    EXPERT_ROLES,
    GRID,
    TRAINED,
    ExperimentLayout,
    StagePaths,
    Variant,
    _dedupe,
    configured_aspects,
    is_multi_aspect,
    read_json,
    slug,
    training_data,
)
from gcsl.runinfo import atomic_path, atomic_write_json, package_versions
from gcsl.stages import ModelFolder, json_line

if TYPE_CHECKING:
    from gcsl.generation.generate import GenerateConfig
    from gcsl.goals import GoalSetup

__all__ = ["ExperimentConfig", "Variant", "run_experiment", "expand_variants", "held_out_prompts",
           "split_validation", "training_data", "is_goal_conditioned", "goal_request_problem", "TRAINED"]


@dataclass
class ExperimentConfig:
    name: str = field(help="experiment name (report title)")
    out: Path = field(help="experiment directory (runs/, report.md, tables, plots)")
    task: str = field(help="evaluation task: one of the registry's tasks (gcsl.tasks.TASKS), e.g. sentiment")
    data: str = field(help="feedback log for `gcsl prepare` (JSONL/CSV/Parquet/dataset)")
    eval_prompts: str = field(help="prompts JSONL for `gcsl generate` (held out from training)")
    model: str = field("smollm2-135m-instruct", help="base model for every method")
    methods: list[str] = field(default_factory=lambda: ["base", "sft", "gcsl", "gcsl-bey-nl"],
                               help="methods to run with the shared options ('base' = the untrained model)")
    variants: list[dict] = field(default_factory=list, cli=False,
                                 help="extra named variants: {name, method, prepare: {...}, train: {...}, seeds, "
                                      "goals, loop: {...} (a loop method), recipe: {...} (a recipe method)}")
    sweeps: list[dict] = field(default_factory=list, cli=False,
                               help="ablation sweeps: {method, option: 'prepare.bins', values: [3, 5, 7]} -> one "
                                    "variant per value")
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], help="seeds for every method")
    method_seeds: dict = field(default_factory=dict, cli=False, help="per-method seed lists overriding --seeds")
    baseline: str = field("sft", help="variant the others are tested against")
    comparisons: list[list[str]] = field(default_factory=list, cli=False,
                                         help="further paired differences at the top goal, each [a, b] read 'a minus "
                                              "b', under the primary and check metrics, e.g. [[online-gcsl-bey-nl, "
                                              "gcsl-bey-nl], [online-gcsl-bey-nl, quark]]")
    primary_metric: str = field("mean_score", help="metric used for comparisons and plots")
    check_metrics: list[str] = field(default_factory=list,
                                     help="further metrics reported beside the primary one with the same tables and "
                                          "curve statistics (e.g. mean_score_textblob: a second, independent scorer)")
    aspect_metrics: dict = field(default_factory=dict, cli=False,
                                 help="multi-aspect variants: the task metric(s) that score each aspect, by aspect "
                                      "name, e.g. {negative sentiment: [mean_score, mean_score_textblob], brevity: "
                                      "[words]}; the report's goal grid and heatmaps show these")
    goal_curve: list[str] = field(default_factory=list,
                                  help="extra goal requests (e.g. scale:1.08, 0.6, level:4) for the goal-following curve")
    goal_curve_methods: list[str] = field(default_factory=lambda: ["gcsl-bey-nl"],
                                          help="variants generated at the goal_curve goals")
    goal_curves: dict = field(default_factory=dict, cli=False,
                              help="goal-following curve per variant or method, e.g. {gcsl: [level:1, level:5], "
                                   "gcsl-bey-nl: [trained, scale:1.12]}; 'trained' expands to one level:K per "
                                   "level the variant trained on; overrides goal_curve for the variants it names. "
                                   "Multi-aspect variants take one request per aspect ('sentiment=level:1,brevity="
                                   "level:2'), and 'grid': every combination of each aspect's trained levels")
    validation_prompts: int = field(0, help="training prompts held out of training for the goal-sensitivity probe "
                                            "(chosen by hash of the prompt, the same for every seed); 0 = none")
    probe: dict = field(default_factory=dict, cli=False,
                        help="options of the goal-sensitivity probe (e.g. batch_size, ci_samples); it runs when "
                             "validation_prompts > 0, on every goal-conditioned variant")
    prepare: dict = field(default_factory=dict, cli=False, help="PrepareConfig options shared by all variants")
    train: dict = field(default_factory=dict, cli=False, help="TrainConfig options shared by all variants")
    online: dict = field(default_factory=dict, cli=False,
                         help="OnlineConfig options shared by the online variants (grpo, rloo), e.g. max_steps, "
                              "num_generations; they also take the shared train block's LoRA and precision options, "
                              "and an online variant's own `train` block holds OnlineConfig options")
    loop: dict = field(default_factory=dict, cli=False,
                       help="LoopConfig options of the online loop variants (online-gcsl-bey-nl, quark), e.g. rounds, "
                            "samples_per_round, pool, window, goal, epochs_per_round, steps_per_round; each round "
                            "prepares, trains and samples with the shared prepare, train and generate blocks "
                            "(steps_per_round / epochs_per_round default to train.max_steps / train.epochs), and a "
                            "variant's own `loop` block overrides these")
    erase: dict = field(default_factory=dict, cli=False,
                        help="EraseConfig options of the unlearning variants (llmeraser), e.g. solver, iterations, "
                             "damping, batch_size; the adapter it erases from trains with the shared train block")
    classifier: dict = field(default_factory=dict, cli=False,
                             help="ClassifierConfig options of PPLM's attribute classifier (pplm), e.g. epochs, "
                                  "learning_rate, batch_size, max_length, held_out; it reads the shared prepare "
                                  "block's columns and classes")
    recipe: dict = field(default_factory=dict, cli=False,
                         help="RecipeConfig options of the recommendation preference recipes (rosepo, sprec), e.g. "
                              "rounds, sample_size, positive_min, negatives, max_smoothing; their stages prepare, "
                              "train and sample with the shared prepare, train and generate blocks (train.max_steps "
                              "is each stage's step count)")
    generate: dict = field(default_factory=dict, cli=False, help="GenerateConfig options shared by all variants")
    evaluate: dict = field(default_factory=dict, cli=False, help="task evaluator options")
    ci_samples: int = field(10_000, help="bootstrap resamples per interval")
    only: list[str] = field(default_factory=list, help="run only these variants (the report still uses all finished)")
    report_only: bool = field(False, help="write the report from the evaluations already recorded (runs/ or records/) "
                                          "and run nothing: no training, sampling or scoring")

    def validate(self) -> list[str]:
        problems = []
        from gcsl.methods import METHODS

        for m in [*self.methods, *(v.get("method", v.get("name")) for v in self.variants),
                  *(s.get("method") for s in self.sweeps)]:
            if m not in METHODS:
                problems.append(f"methods: unknown method {m!r} (known: {', '.join(METHODS)})")
            elif METHODS[m].tasks is not None and self.task not in METHODS[m].tasks:
                problems.append(f"methods: {m} is a baseline of task {' / '.join(METHODS[m].tasks)} only; drop it "
                                f"for task {self.task}")
        if not self.seeds:
            problems.append("seeds: give at least one seed")
        if self.validation_prompts < 0:
            problems.append(f"validation_prompts: must be >= 0, got {self.validation_prompts}")
        for where, goals in [("goal_curve", self.goal_curve),
                             *((f"goal_curves.{k}", v) for k, v in self.goal_curves.items()),
                             *((f"variants[{v.get('name')}].goals", v["goals"]) for v in self.variants if "goals" in v)]:
            if not isinstance(goals, list):
                problems.append(f"{where}: expected a list of goal requests, got {goals!r}")
                continue
            problems.extend(f"{where}: {why}" for why in map(goal_request_problem, goals) if why)
        problems.extend(f"comparisons: {pair!r} is not a pair [variant, variant it is compared with]"
                        for pair in self.comparisons if not (isinstance(pair, list) and len(pair) == 2
                                                             and all(isinstance(x, str) for x in pair)))
        for s in self.sweeps:
            if not {"method", "option", "values"} <= set(s):
                problems.append("sweeps: each sweep needs method, option (e.g. prepare.bins) and values")
            elif s["option"].split(".")[0] not in ("prepare", "train", "generate", "recipe"):
                problems.append(f"sweeps: option {s['option']!r} must start with prepare., train., generate. or "
                                "recipe.")
        problems.extend(self._stage_option_problems())
        problems.extend(self._online_problems())
        return problems

    def _online_methods(self) -> set[str]:
        from gcsl.methods import METHODS

        used = [*self.methods, *(v.get("method", v.get("name")) for v in self.variants),
                *(s.get("method") for s in self.sweeps)]
        return {m for m in used if m in METHODS and METHODS[m].online is not None}

    def _loop_methods(self) -> set[str]:
        from gcsl.methods import METHODS

        used = [*self.methods, *(v.get("method", v.get("name")) for v in self.variants),
                *(s.get("method") for s in self.sweeps)]
        return {m for m in used if m in METHODS and METHODS[m].loop is not None}

    def _online_problems(self) -> list[str]:
        """Online variants (and online loops) need the task's scorer as a reward, and OnlineConfig (LoopConfig)
        options (caught before training)."""
        import dataclasses

        from gcsl.training.online import OnlineConfig, reward_hook
        from gcsl.training.online_loop import loop_problems

        problems = []
        loops = self._loop_methods()
        problems.extend(loop_problems(self.loop))
        for v in self.variants:
            problems.extend(f"variants[{v.get('name')}].{why}" for why in loop_problems(v.get("loop", {}) or {}))
        if loops:
            try:
                reward_hook(self.task)
            except ConfigError as exc:
                problems.append(f"methods: {', '.join(sorted(loops))}: {exc}")
        online = self._online_methods()
        known = {f.name for f in dataclasses.fields(OnlineConfig)}
        problems.extend(f"online.{key}: unknown option of OnlineConfig" for key in self.online if key not in known)
        for v in self.variants:
            if v.get("method", v.get("name")) in online:
                problems.extend(f"variants[{v.get('name')}].train.{key}: unknown option of OnlineConfig (an online "
                                "variant's train block holds OnlineConfig options)"
                                for key in v.get("train", {}) or {} if key not in known)
        if online:
            try:
                reward_hook(self.task)
            except ConfigError as exc:
                problems.append(f"methods: {', '.join(sorted(online))}: {exc}")
        return problems

    def _stage_option_problems(self) -> list[str]:
        """Unknown stage options are caught here, before hours of training, not when a stage starts."""
        import dataclasses

        from gcsl.data.prepare import PrepareConfig
        from gcsl.generation.generate import GenerateConfig
        from gcsl.tasks import get_task
        from gcsl.training.train import TrainConfig

        problems = []
        stages = {"prepare": PrepareConfig, "train": TrainConfig, "generate": GenerateConfig}
        online = self._online_methods()
        sources = [("", self.__dict__)] + [(f"variants[{v.get('name')}].", v) for v in self.variants]
        for where, holder in sources:
            for stage, cls in stages.items():
                known = {f.name for f in dataclasses.fields(cls)}
                if stage == "train" and holder is not self.__dict__ and holder.get("method", holder.get("name")) in online:
                    continue  # an online variant's train block holds OnlineConfig options (_online_problems)
                for key in holder.get(stage, {}) or {}:
                    if key not in known:
                        problems.append(f"{where}{stage}.{key}: unknown option of {cls.__name__}")
        for s in self.sweeps:
            stage, _, key = str(s.get("option", "")).partition(".")
            if stage in stages and key not in {f.name for f in dataclasses.fields(stages[stage])}:
                problems.append(f"sweeps: {s['option']} is not an option of {stages[stage].__name__}")
        try:
            task = get_task(self.task)
        except ConfigError as exc:
            return [*problems, str(exc)]
        try:
            resolve_config(task.eval_config, overrides=dict(self.evaluate))
        except ConfigError as exc:
            problems.append(f"evaluate: {exc}")
        # A metric the task does not emit would leave the report empty after all the training.
        for where, metric in (("primary_metric", self.primary_metric),
                              *(("check_metrics", m) for m in self.check_metrics)):
            if task.metric(metric) is None:
                problems.append(f"{where}: task {self.task} does not report {metric!r}; choose one of "
                                f"{', '.join(task.metric_names)}")
        from gcsl.experiments.report import aspect_metric_problems

        problems.extend(aspect_metric_problems(self, task))
        from gcsl.probe import ProbeConfig

        known = {f.name for f in dataclasses.fields(ProbeConfig)}
        problems.extend(f"probe.{key}: unknown option of ProbeConfig" for key in self.probe if key not in known)
        # These blocks' modules load only when the blocks are given (the eraser's loads torch).
        # Recipe options: the experiment's block, and a variant's or a sweep's, which only a recipe method takes.
        blocks = [("recipe.", None, list(self.recipe))]
        blocks += [(f"variants[{v.get('name')}].recipe.", v.get("method", v.get("name")), list(v["recipe"]))
                   for v in self.variants if v.get("recipe")]
        blocks += [("sweeps: recipe.", s.get("method"), [s["option"].partition(".")[2]])
                   for s in self.sweeps if str(s.get("option", "")).startswith("recipe.")]
        if any(keys for _, _, keys in blocks):
            from gcsl.methods import METHODS
            from gcsl.tasks.recommendation.preference import RECIPE_SET_BY_RUNNER, RecipeConfig

            known = {f.name for f in dataclasses.fields(RecipeConfig)} - set(RECIPE_SET_BY_RUNNER)
            problems.extend(f"{where}{key}: unknown option of RecipeConfig (one of {', '.join(sorted(known))})"
                            for where, _, keys in blocks for key in keys if key not in known)
            problems.extend(f"{where}{', '.join(keys)}: method {method} is not a recipe (rosepo, sprec); recipe "
                            "options apply to those only" for where, method, keys in blocks
                            if method in METHODS and METHODS[method].recipe is None)
        if self.erase:
            from gcsl.training.eraser import EraseConfig

            # The runner sets the folders and the seed itself.
            known = {f.name for f in dataclasses.fields(EraseConfig)} - {"model", "data", "erase", "out", "seed"}
            problems.extend(f"erase.{key}: unknown option of EraseConfig (one of {', '.join(sorted(known))})"
                            for key in self.erase if key not in known)
        if self.classifier:
            from gcsl.generation.pplm import CLASSIFIER_SET_BY_RUNNER, ClassifierConfig

            known = {f.name for f in dataclasses.fields(ClassifierConfig)} - set(CLASSIFIER_SET_BY_RUNNER)
            problems.extend(f"classifier.{key}: unknown option of ClassifierConfig (one of {', '.join(sorted(known))})"
                            for key in self.classifier if key not in known)
        return problems


def goal_request_problem(goal: Any) -> str | None:
    """Why a goal request cannot be right (None if it may be): caught before hours of training.

    >>> goal_request_problem("level:2"), goal_request_problem("scale:x")
    (None, "goal 'scale:x': the scale factor must be a number, e.g. scale:1.12")
    """
    text = str(goal)
    if text in ("top", TRAINED, GRID):
        return None
    if "=" in text:  # one request per aspect: name=request,name=request
        for part in text.split(","):
            name, _, request = (x.strip() for x in part.partition("="))
            why = ("write one request per aspect as name=request, e.g. sentiment=level:2,brevity=top"
                   if not name or not request or request in (TRAINED, GRID) else goal_request_problem(request))
            if why:
                return f"goal {text!r}: {why}"
        return None
    kind, sep, arg = text.partition(":")
    if sep and kind == "level":
        return None if arg.isdigit() and int(arg) >= 1 else f"goal {text!r}: the level must be a whole number >= 1"
    if sep and kind == "scale":
        try:
            float(arg)
        except ValueError:
            return f"goal {text!r}: the scale factor must be a number, e.g. scale:1.12"
        return None
    try:
        float(text)
    except ValueError:
        return f"goal {text!r}: use top, {TRAINED}, level:K, scale:F or a number"
    return None


def expand_variants(cfg: ExperimentConfig) -> list[Variant]:
    """The experiment's variants: one per method, one per extra variant, one per sweep value."""
    def seeds_for(name: str, method: str) -> list[int]:
        return list(cfg.method_seeds.get(name, cfg.method_seeds.get(method, cfg.seeds)))

    def curve_for(name: str, method: str, *, by_method: bool = True) -> list[str]:
        # The variant's own entry first, then its method's; sweep variants only by their own name,
        # so a sweep does not multiply the curve's generations.
        if name in cfg.goal_curves:
            return [str(g) for g in cfg.goal_curves[name]]
        if by_method and method in cfg.goal_curves:
            return [str(g) for g in cfg.goal_curves[method]]
        if cfg.goal_curve and (name in cfg.goal_curve_methods or (by_method and method in cfg.goal_curve_methods)):
            return ["top", *cfg.goal_curve]  # the list form's curve always ran through the top goal
        return []

    def variant(name: str, method: str, prepare: dict, train: dict, generate: dict, seeds: list[int],
                curve: list[str]) -> Variant:
        return Variant(name, method, prepare, train, generate, seeds, _dedupe(["top", *curve]), curve)

    out = [variant(m, m, {}, {}, {}, seeds_for(m, m), curve_for(m, m)) for m in cfg.methods]
    for v in cfg.variants:
        name, method = v["name"], v.get("method", v["name"])
        # An explicit goal list is the whole list of requests; its non-top goals are the curve.
        curve = [str(g) for g in v["goals"] if str(g) != "top"] if "goals" in v else curve_for(name, method)
        out.append(variant(name, method, dict(v.get("prepare", {})), dict(v.get("train", {})),
                           dict(v.get("generate", {})), list(v.get("seeds", seeds_for(name, method))), curve))
        out[-1].loop = dict(v.get("loop", {}) or {})
        out[-1].recipe = dict(v.get("recipe", {}) or {})
    for s in cfg.sweeps:
        stage, key = s["option"].split(".", 1)
        for value in s["values"]:
            name = f"{s['method']}[{key}={value}]"
            over = {"prepare": {}, "train": {}, "generate": {}, "recipe": {}}
            over[stage][key] = value
            out.append(variant(name, s["method"], over["prepare"], over["train"], over["generate"],
                               list(s.get("seeds", seeds_for(name, s["method"]))),
                               curve_for(name, s["method"], by_method=False)))
            out[-1].recipe = over["recipe"]
    names = [v.name for v in out]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"variants: duplicate names {', '.join(sorted(dupes))}; give each variant a unique name")
    unknown = sorted(set(cfg.goal_curves) - set(names) - {v.method for v in out})
    if unknown:
        raise ConfigError(f"goal_curves: {', '.join(unknown)} name(s) no variant or method of this experiment; "
                          f"use one of {', '.join(names)}")
    unknown = sorted({name for pair in cfg.comparisons for name in pair} - set(names))
    if unknown:
        raise ConfigError(f"comparisons: {', '.join(unknown)} name(s) no variant of this experiment; "
                          f"use one of {', '.join(names)}")
    # An --only that names nothing would run nothing and still rewrite the report, looking like success.
    unknown = sorted(set(cfg.only) - set(names))
    if unknown:
        raise ConfigError(f"only: {', '.join(unknown)} name(s) no variant of this experiment; use one or more of "
                          f"{', '.join(names)}, separated by spaces")
    return out


def is_goal_conditioned(setup: GoalSetup) -> bool:
    """Whether a prepared variant's model reads a goal: goal text, reward tokens or a goal embedding."""
    from gcsl.methods import get_method

    return get_method(setup.method).is_goal_conditioned


# -- validation split ----------------------------------------------------------------------

def _prompt_key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def held_out_prompts(prompts: Iterable[Any], n: int) -> set[str]:
    """The ``n`` distinct prompts (as keys) with the smallest SHA-256 of their text.

    A hash, not a seeded shuffle: the split is the same for every seed and method, and a prompt
    stays on its side when rows are added to or removed from the log. Chat prompts are keyed by
    their JSON.

    >>> held_out_prompts(["a", "b", "b", "c"], 1)  # sha256("c") = 2e7d..., the smallest of the three
    {'c'}
    """
    keys = sorted({_prompt_key(p) for p in prompts}, key=lambda k: hashlib.sha256(k.encode("utf-8")).hexdigest())
    if n >= len(keys):
        raise ConfigError(f"validation_prompts: {n} would hold out all {len(keys)} distinct training prompts; "
                          "choose fewer")
    return set(keys[:n])


def split_validation(cfg: ExperimentConfig) -> tuple[Path, Path] | None:
    """Writes ``train_feedback.jsonl`` and ``validation.jsonl`` (the held-out prompts' rows) into ``out``.

    Rows keep the log's prompt, response and score columns under their own names, which is all
    prepare and the probe read. Files are rewritten only when their bytes would change, so a
    re-run leaves them (and every stage reading them) untouched.
    """
    if cfg.validation_prompts <= 0:
        return None
    from gcsl.data.load import read_feedback
    from gcsl.goals.aspects import read_aspects

    cols = {k: cfg.prepare.get(f"{k}_column", k) for k in ("prompt", "response", "score")}
    # Multi-aspect variants read their aspects' columns too: the split keeps every one of them. With
    # shared aspects the first aspect's column is the score (as prepare reads it).
    shared = read_aspects(cfg.prepare.get("aspects") or [])[0]
    aspect_cols = tuple(_dedupe(a.column for a in configured_aspects(cfg)))
    if shared:
        cols["score"] = shared[0].column
    table, _ = read_feedback(cfg.data, prompt_column=cols["prompt"], response_column=cols["response"],
                             score_column=cols["score"], fmt=cfg.prepare.get("data_format", "auto"),
                             split=cfg.prepare.get("split", "train"), aspect_columns=aspect_cols)
    rows = [{cols["prompt"]: r["prompt"], cols["response"]: r["response"], cols["score"]: r["score_raw"],
             **{c: r[f"aspect:{c}"] for c in aspect_cols}} for r in table.to_pylist()]
    held = held_out_prompts((r[cols["prompt"]] for r in rows), cfg.validation_prompts)
    train_path, val_path = Path(training_data(cfg)), Path(cfg.out) / "validation.jsonl"
    for path, part in ((train_path, [r for r in rows if _prompt_key(r[cols["prompt"]]) not in held]),
                       (val_path, [r for r in rows if _prompt_key(r[cols["prompt"]]) in held])):
        text = "".join(json_line(r) for r in part)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            # Variants prepared on the old split may have trained on prompts now held out.
            if path.is_file() and ExperimentLayout(cfg.out).trained_on_split():
                raise ConfigError(f"{path}: the validation split differs from the one this experiment's variants "
                                  "were prepared on (validation_prompts or data changed); choose another out")
            with atomic_path(path) as tmp:
                tmp.write_text(text, encoding="utf-8")
    return train_path, val_path


def _check_prepared_data(cfg: ExperimentConfig, prepared: Path) -> None:
    """A cached prepare must have read today's training data, or validation prompts could leak into training."""
    record = read_json(prepared / "run.json")
    config = (record or {}).get("config", {})
    used, made_at = config.get("data"), Path(config.get("out") or prepared)
    # An experiment folder moved (or merged from folders run side by side) keeps its own split: the training
    # split file of the folder the prepare ran in is this folder's.
    own_split = (used is not None and cfg.validation_prompts > 0 and Path(used).name == Path(training_data(cfg)).name
                 and Path(used).parent / "runs" in made_at.parents)
    if used is not None and not own_split and Path(used).resolve() != Path(training_data(cfg)).resolve():
        raise ConfigError(f"{prepared}: prepared from {used}, but this experiment trains on {training_data(cfg)}; "
                          "remove that folder (and its seeds' models) or choose another out")


# -- copies kept with the report -----------------------------------------------------------

def _keep_items(p: StagePaths, task: str, *, fresh: bool) -> None:
    """Copies each generation's completion and scores out of runs/ (not committed) into items/, with the
    fields the task needs to re-score a row (:attr:`gcsl.tasks.base.Task.item_fields`).

    ``fresh``: the evaluation just ran, so an older copy is replaced; otherwise only a missing
    copy is written (runs evaluated before copies were kept get theirs on the next run).
    """
    if (p.items.exists() and not fresh) or not p.eval_items.exists():
        return
    from gcsl.stages import iter_jsonl, write_jsonl
    from gcsl.tasks import get_task

    keep = ("prompt_id", "sample", "completion", "status", "reason", *get_task(task).item_fields)
    rows = [{k: v for k, v in item.items() if k in keep or k.startswith("score")}
            for _, item in iter_jsonl(p.eval_items, "items")]
    write_jsonl(p.items, rows)


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _resolved_goal(setup: GoalSetup | None, request: str) -> tuple | None:
    """What a goal request asks the model for (text and value), or None for goal-free variants."""
    from gcsl.goals import inference_goal

    if setup is None:
        return None
    goal = inference_goal(setup, request)
    return None if goal.text is None and goal.value is None else (goal.text, goal.value)


def _copy_generations(source: Path, out: Path, request: str) -> None:
    """Another request's samples of the same goal, each row relabelled with this request."""
    from gcsl.stages import iter_jsonl, write_jsonl

    write_jsonl(out, [{**row, "goal_request": request} for _, row in iter_jsonl(source, "generations")])


def _probe(cfg: ExperimentConfig, paths: StagePaths, seed: int, aspect: str | None = None) -> None:
    """Runs the goal-sensitivity probe on the validation rows (cached: skipped once probe.json exists); a
    multi-aspect model's probe of one ``aspect`` goes to a subfolder named after it."""
    from gcsl.probe import ProbeConfig, run_probe

    folder, out = (paths.probe, paths.probe_out) if aspect is None else \
        (paths.probe / slug(aspect), paths.probe_out / slug(aspect))
    fresh = not (folder / "probe.json").exists()
    if fresh:
        _say(f"  probe -> {folder}")
        cols = {f"{k}_column": cfg.prepare.get(f"{k}_column", k) for k in ("prompt", "response", "score")}
        run_probe(resolve_config(ProbeConfig, overrides={
            "seed": seed, **cfg.probe, **cols, "model": str(paths.model),
            "data": str(ExperimentLayout(cfg.out).validation), "out": folder, "aspect": aspect}))
    for name in ("probe.json", "probe.png"):
        src, dst = folder / name, out / name
        if src.exists() and (fresh or not dst.exists()):  # a probe run now replaces an older copy
            _copy_atomic(src, dst)


def _split_format(split: tuple[Path, Path] | None) -> dict[str, str]:
    """The prepare override for reading the training data: the validation split's training file is JSONL
    whatever the log's own format was; without a split the prepare block's own format stands."""
    return {"data_format": "jsonl"} if split is not None else {}


def _log_reading(cfg: ExperimentConfig, split: tuple[Path, Path] | None) -> tuple[dict[str, str], dict[str, str]]:
    """How a workflow that reads the feedback log itself (online, loop, recipe) finds its columns and format:
    the prepare block's, or JSONL when the validation split wrote the training file."""
    columns = {f"{k}_column": cfg.prepare.get(f"{k}_column", k) for k in ("prompt", "response", "score")}
    source = _split_format(split) or {"data_format": cfg.prepare.get("data_format", "auto"),
                                      "split": cfg.prepare.get("split", "train")}
    return columns, source


def _evaluate_options(cfg: ExperimentConfig, method: str) -> dict[str, Any]:
    """The evaluator options a method's generations are scored with: its table entry's ``evaluate_defaults``
    (``BASE_MODEL`` read as the experiment's model) beneath the experiment's ``evaluate`` block.

    >>> _evaluate_options(ExperimentConfig(name="x", out=Path("r"), task="recommendation", data="t.jsonl",
    ...     eval_prompts="p.jsonl", model="m"), "bigrec")  # doctest: +SKIP
    {'grounding': 'bigrec-l2', 'lm': 'm'}
    """
    from gcsl.methods import BASE_MODEL, get_method

    own = {k: cfg.model if val == BASE_MODEL else val for k, val in get_method(method).evaluate_defaults}
    return {**own, **cfg.evaluate}


def _own_protocol(method: str) -> dict[str, Any]:
    """Generate options a method's own protocol fixes: a method scored by its own grounding (BIGRec) samples a
    title to ground even where the experiment ranks the catalogue (``generate.rank_catalogue``)."""
    from gcsl.methods import get_method

    return {"rank_catalogue": None} if dict(get_method(method).evaluate_defaults).get("grounding") else {}


def _say(msg: str) -> None:
    print(f"[gcsl experiment {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- variant kinds ----------------------------------------------------------------------------
# What a variant generates with, by its method's kind (gcsl.methods.Method.variant_kind): the base
# model as it is, a model trained by prepare -> train (-> probe), the base model steered while
# decoding, no model at all (a heuristic writes the generations itself), or an adapter trained online
# (GRPO / RLOO sampling the training prompts, rewarded by the task's scorer).

@dataclass(frozen=True)
class _Generator:
    """What a variant generates with: ``model`` sampled with ``generate``'s extra options, or, when
    ``write`` is set, no model: ``write`` makes the generations file from the resolved generate options
    (their prompts, out, num_samples, seed, limit and prompt fields; ``model`` only names the method)."""

    model: str
    generate: dict[str, Any]
    write: Callable[[GenerateConfig], Path] | None = None


def _base_generator(cfg: ExperimentConfig, layout: ExperimentLayout, v: Variant, seed: int,
                    split: tuple[Path, Path] | None) -> _Generator:
    return _Generator(cfg.model, {})


def _prepare_and_train(cfg: ExperimentConfig, v: Variant, method: str, prepared: Path, model: Path, seed: int,
                       split: tuple[Path, Path] | None) -> None:
    """Prepares (once for the seeds) and trains one model of ``method`` with the variant's overrides, each
    stage skipped once finished."""
    from gcsl.data.prepare import PrepareConfig, prepare
    from gcsl.goals import GoalSetup
    from gcsl.training.train import TrainConfig, check_same_training, train

    if not (prepared / "goals.json").is_file():
        _say(f"  prepare {method} -> {prepared}")
        prepare(resolve_config(PrepareConfig, overrides={
            **cfg.prepare, **v.prepare, "data": training_data(cfg), **_split_format(split), "method": method,
            "out": prepared, "overwrite": True}))
    GoalSetup.load(prepared)  # a goals file that is there but unreadable is an error, not "not prepared"
    _check_prepared_data(cfg, prepared)
    options = {**cfg.train, **v.train, "data": prepared, "model": cfg.model, "seed": seed, "out": model}
    folder = ModelFolder(model)
    if folder.state == "complete":
        check_same_training(model, resolve_config(TrainConfig, overrides=options))
    else:
        # An interrupted run continues from its last whole checkpoint; one that died before its
        # first checkpoint starts over.
        resume = folder.last_checkpoint is not None
        _say(f"  train -> {model}" + (f" (resuming from {folder.last_checkpoint.name})" if resume else ""))
        train(resolve_config(TrainConfig, overrides={
            **options, "resume": resume, "overwrite": folder.state == "partial" and not resume}))


def _trained_generator(cfg: ExperimentConfig, layout: ExperimentLayout, v: Variant, seed: int,
                       split: tuple[Path, Path] | None) -> _Generator:
    """Prepares (shared by the seeds), trains and probes the variant, each stage skipped once finished."""
    paths = layout.stage(v.name, seed)
    _prepare_and_train(cfg, v, v.method, paths.prepared, paths.model, seed, split)
    _probe_goals(cfg, v, paths, seed, layout.goal_setup(v.name), split)
    return _Generator(str(paths.model), {})


def _probe_goals(cfg: ExperimentConfig, v: Variant, paths: StagePaths, seed: int, setup: GoalSetup | None,
                 split: tuple[Path, Path] | None) -> None:
    """The goal-sensitivity probe of a model trained with ``setup``'s goals, where there are goals to compare."""
    if split is not None and setup is not None and is_goal_conditioned(setup):
        if is_multi_aspect(setup):
            # One probe per aspect: its goal varies, the others ask for their top goal.
            for a in setup.aspects:
                if len(a.trained_levels) < 2:
                    _say(f"  probe of {a.metric.name} skipped: {v.name} trained one {a.metric.name} goal only")
                else:
                    _probe(cfg, paths, seed, aspect=a.metric.name)
        elif len(setup.trained_levels) < 2:
            _say(f"  probe skipped: {v.name} trained on one goal only, so there is no goal to compare it with")
        else:
            _probe(cfg, paths, seed)


def _decoding_generator(cfg: ExperimentConfig, layout: ExperimentLayout, v: Variant, seed: int,
                        split: tuple[Path, Path] | None) -> _Generator:
    """DExperts: trains the expert and the anti-expert (the methods its table entry names, with the
    variant's prepare/train overrides) and samples from the base model steered by them."""
    from gcsl.methods import get_method

    models = []
    for role, method in zip(EXPERT_ROLES, get_method(v.method).experts):
        paths = layout.expert(v.name, role, seed)
        _prepare_and_train(cfg, v, method, paths.prepared, paths.model, seed, split)
        models.append(str(paths.model))
    expert, anti = models
    alpha = {**cfg.generate, **v.generate}.get("alpha", 2.0)
    return _Generator(cfg.model, {"expert": expert, "anti_expert": anti, "alpha": alpha})


def _classifier_generator(cfg: ExperimentConfig, layout: ExperimentLayout, v: Variant, seed: int,
                          split: tuple[Path, Path] | None) -> _Generator:
    """PPLM: trains the attribute classifier on the base model's hidden states (once per seed, in the seed's model
    folder, skipped once complete) from the training feedback (less the validation prompts), its classes the rows
    sft and sft-bottom would keep under the variant's prepare options, and samples the base model steered by it."""
    from gcsl.generation.pplm import ClassifierConfig, train_classifier

    folder = layout.stage(v.name, seed).model
    if ModelFolder(folder).state != "complete":
        _say(f"  train PPLM classifier -> {folder}")
        train_classifier(resolve_config(ClassifierConfig, overrides={
            **cfg.classifier, "model": cfg.model, "data": training_data(cfg), "out": folder, "seed": seed,
            "overwrite": True, "prepare": {**cfg.prepare, **v.prepare, **_split_format(split)}}))
    return _Generator(cfg.model, {"classifier": str(folder)})


def _heuristic_generator(cfg: ExperimentConfig, layout: ExperimentLayout, v: Variant, seed: int,
                         split: tuple[Path, Path] | None) -> _Generator:
    """A baseline with no model (random, most-popular): recommendation's baselines module writes its
    generations, from the training feedback (less the validation prompts) and the catalogue the evaluator
    grounds against. The method table allows heuristics for recommendation only (ExperimentConfig.validate)."""
    from gcsl.tasks.recommendation.baselines import BaselineConfig, write_baseline_generations
    from gcsl.tasks.recommendation.evaluation import RecommendationEvalConfig

    grounding = resolve_config(RecommendationEvalConfig, overrides=dict(cfg.evaluate))
    feedback = {f"{k}_column": cfg.prepare.get(f"{k}_column", k) for k in ("prompt", "response", "score")}
    # The split file is JSONL whatever the log's own format was.
    feedback["data_format"] = "jsonl" if split is not None else cfg.prepare.get("data_format", "auto")

    def write(gen: GenerateConfig) -> Path:
        return write_baseline_generations(resolve_config(BaselineConfig, overrides={
            "kind": v.method, "prompts": gen.prompts, "out": gen.out, "dataset": grounding.dataset,
            "path": grounding.path, "feedback": training_data(cfg), **feedback, "num_samples": gen.num_samples,
            "seed": gen.seed, "limit": gen.limit, "id_field": gen.id_field, "prompt_field": gen.prompt_field,
            "split": gen.split, "rank": gen.rank_catalogue is not None}))

    return _Generator(v.method, {}, write)


def _online_generator(cfg: ExperimentConfig, layout: ExperimentLayout, v: Variant, seed: int,
                      split: tuple[Path, Path] | None) -> _Generator:
    """GRPO / RLOO: trains (once per seed; skipped once its model folder is complete) a LoRA adapter online on
    the distinct prompts of the training feedback (less the validation prompts), rewarded by the task's scorer
    with the experiment's evaluator options, and generates with it like any trained, goal-free model. An
    interrupted run continues from its last whole checkpoint, as trained variants do."""
    from gcsl.methods import get_method
    from gcsl.training.online import SHARED_TRAIN_OPTIONS, OnlineConfig, train_online

    model = layout.stage(v.name, seed).model
    folder = ModelFolder(model)
    if folder.state != "complete":
        resume = folder.last_checkpoint is not None
        _say(f"  train online ({get_method(v.method).online}) -> {model}"
             + (f" (resuming from {folder.last_checkpoint.name})" if resume else ""))
        columns, source = _log_reading(cfg, split)
        shared = {k: val for k, val in cfg.train.items() if k in SHARED_TRAIN_OPTIONS}
        train_online(resolve_config(OnlineConfig, overrides={
            **shared, **cfg.online, **v.train, **columns, **source, "data": training_data(cfg), "out": model,
            "model": cfg.model, "task": cfg.task, "task_options": dict(cfg.evaluate), "seed": seed,
            "resume": resume, "overwrite": folder.state == "partial" and not resume}), get_method(v.method).online)
    return _Generator(str(model), {})


def _stage_options(owned: Iterable[str], *blocks: dict) -> dict:
    """The stage options of ``blocks`` merged (later blocks win), less those the workflow sets itself (``owned``).

    >>> _stage_options(("out",), {"lr": 1, "out": "x"}, {"lr": 2})
    {'lr': 2}
    """
    merged = {k: val for block in blocks for k, val in block.items()}
    return {k: val for k, val in merged.items() if k not in set(owned)}


def _loop_generator(cfg: ExperimentConfig, layout: ExperimentLayout, v: Variant, seed: int,
                    split: tuple[Path, Path] | None) -> _Generator:
    """An online loop (online-gcsl-bey-nl, quark): rounds of sample -> score -> pool -> prepare -> train with the method
    its table entry names, from the training feedback (less the validation prompts) and its distinct prompts,
    scored by the task's scorer with the experiment's evaluator options; each round cached under the seed's
    ``loop/`` folder (a re-run resumes at the first unfinished round), the last round's model copied to the
    seed's model folder, which generates like any trained GCSL model, and is probed like one (its goals are the
    last round's). Skipped once that folder holds the configured rounds; more rounds configured extend the loop
    (the seed's generations, scores and probe, made with the old final model, are made again), fewer are refused."""
    from gcsl.methods import get_method
    from gcsl.training.online_loop import OWNED_OPTIONS, LoopConfig, read_rounds, run_online_loop

    def stage_options(stage: str, *blocks: dict) -> dict:
        return _stage_options(OWNED_OPTIONS[stage], *blocks)

    # The entry's own training defaults (quark: Quark's KL and entropy coefficients) sit beneath the user's options.
    train = {**dict(get_method(v.method).train_defaults), **cfg.train, **v.train}
    per_round = {key: train[name] for key, name in (("steps_per_round", "max_steps"), ("epochs_per_round", "epochs"))
                 if train.get(name) is not None}
    columns, source = _log_reading(cfg, split)
    paths = layout.stage(v.name, seed)
    model = paths.model
    loop = resolve_config(LoopConfig, overrides={
        **per_round, **cfg.loop, **v.loop, **columns, **source, "data": training_data(cfg),
        "out": layout.loop(v.name, seed), "model_out": model, "model": cfg.model, "method": get_method(v.method).loop,
        "task": cfg.task, "task_options": dict(cfg.evaluate), "seed": seed,
        "prepare": stage_options("prepare", cfg.prepare, v.prepare), "train": stage_options("train", train),
        "generate": stage_options("generate", cfg.generate, v.generate)})
    done = len(read_rounds(model) or []) if ModelFolder(model).state == "complete" else None
    # Like every other kind, a finished model is not made again, unless the loop is to go on for more rounds.
    if done != loop.rounds + 1:
        if done is not None and done < loop.rounds + 1:
            # What the old final model made is stale; removed first, so a run cut short here still redoes it.
            for stale in [*paths.gens.parent.glob("gens-*"), *paths.gens.parent.glob("metrics-*")]:
                stale.unlink()
            shutil.rmtree(paths.probe, ignore_errors=True)
        _say(f"  online loop ({get_method(v.method).loop}) -> {layout.loop(v.name, seed)}")
        run_online_loop(loop)  # refuses fewer rounds than the loop folder holds
    _probe_goals(cfg, v, paths, seed, ModelFolder(model).goal_setup(), split)
    return _Generator(str(model), {})


def _erased_generator(cfg: ExperimentConfig, layout: ExperimentLayout, v: Variant, seed: int,
                      split: tuple[Path, Path] | None) -> _Generator:
    """LLMEraser: trains (once per seed) an adapter with the first method its table entry names (every row), prepares
    the rows to remove with the second (the same prepare options, so the same log and cut), and writes that adapter
    with their influence removed to the seed's model folder, which generates like any goal-free trained model.
    The experiment's own variant of the first method is reused when the variant changes no prepare or train option.
    Skipped once the model folder is complete."""
    from gcsl.methods import get_method
    from gcsl.training.eraser import EraseConfig, erase

    full_method, erase_method = get_method(v.method).erases
    paths = layout.stage(v.name, seed)
    if ModelFolder(paths.model).state == "complete":
        return _Generator(str(paths.model), {})
    reuse = full_method in cfg.methods and not v.prepare and not v.train
    full = layout.stage(full_method, seed) if reuse else paths
    full_model = full.model if reuse else paths.model.with_name("full")
    _prepare_and_train(cfg, v, full_method, full.prepared, full_model, seed, split)
    erase_dir = paths.prepared.parent / "erase" / "prepared"
    if not (erase_dir / "goals.json").is_file():
        _say(f"  prepare the rows to erase ({erase_method}) -> {erase_dir}")
        from gcsl.data.prepare import PrepareConfig, prepare

        prepare(resolve_config(PrepareConfig, overrides={
            **cfg.prepare, **v.prepare, "data": training_data(cfg), **_split_format(split), "method": erase_method,
            "out": erase_dir, "overwrite": True}))
    _say(f"  erase {erase_method} rows from {full_model} -> {paths.model}")
    erase(resolve_config(EraseConfig, overrides={
        "seed": seed, **cfg.erase, "model": full_model, "data": full.prepared, "erase": erase_dir,
        "out": paths.model, "max_length": {**cfg.train, **v.train}.get("max_length", 1024), "overwrite": True}))
    return _Generator(str(paths.model), {})


def _recipe_generator(cfg: ExperimentConfig, layout: ExperimentLayout, v: Variant, seed: int,
                      split: tuple[Path, Path] | None) -> _Generator:
    """RosePO / SPRec: their stages (SFT on the liked rows, the model's own recommendations, DPO on the pairs they
    make) from the training feedback (less the validation prompts) and the evaluator's catalogue, each cached under
    the seed's ``recipe/`` folder; the last stage's model goes to the seed's model folder and generates like any
    goal-free trained model. Once that folder is complete only its stages' settings are checked."""
    from gcsl.methods import get_method
    from gcsl.tasks.recommendation.evaluation import RecommendationEvalConfig
    from gcsl.tasks.recommendation.preference import STAGE_OWNED, RecipeConfig, run_recipe

    def stage_options(stage: str, *blocks: dict) -> dict:
        return _stage_options(STAGE_OWNED[stage], *blocks)

    model = layout.stage(v.name, seed).model
    # A finished recipe whose stages are here goes through them again, each one cached: that checks every stage
    # against the settings, so a changed one (a stage learning rate, say) is an error, not the old model.
    if ModelFolder(model).state == "complete" and not (model.parent / "recipe").is_dir():
        return _Generator(str(model), {})
    grounding = resolve_config(RecommendationEvalConfig, overrides=dict(cfg.evaluate))
    train = {**cfg.train, **v.train}
    steps = train.pop("max_steps", -1)
    columns, source = _log_reading(cfg, split)
    # The experiment's other recipes and trained methods at this seed: a stage that trains what one of them trained
    # (round 0's SFT on the liked rows, as BIGRec does) takes that model rather than training it again.
    kinds = {o.name: get_method(o.method).variant_kind for o in expand_variants(cfg) if o.name != v.name}
    share = [layout.stage(name, seed).model.parent / "recipe" for name, kind in kinds.items() if kind == "recipe"]
    share += [layout.stage(name, seed).model for name, kind in kinds.items() if kind == "trained"]
    _say(f"  recipe {get_method(v.method).recipe} -> {model.parent / 'recipe'}")
    run_recipe(resolve_config(RecipeConfig, overrides={
        "steps_per_stage": steps, **cfg.recipe, **v.recipe, **columns, **source, "method": get_method(v.method).recipe,
        "data": training_data(cfg), "out": model.parent / "recipe", "model_out": model, "model": cfg.model,
        "seed": seed, "catalogue_dataset": grounding.dataset, "catalogue_path": grounding.path, "share": share,
        "prepare": stage_options("prepare", cfg.prepare, v.prepare), "train": stage_options("train", train),
        "generate": stage_options("generate", cfg.generate, v.generate)}))
    return _Generator(str(model), {})


_GENERATORS = {"base": _base_generator, "trained": _trained_generator, "decoding": _decoding_generator,
               "heuristic": _heuristic_generator, "online": _online_generator, "loop": _loop_generator,
               "erased": _erased_generator, "recipe": _recipe_generator, "classifier": _classifier_generator}


def run_experiment(cfg: ExperimentConfig) -> Path:
    """Runs every variant x seed through its stages (skipping finished ones) and writes the report."""
    from gcsl.evaluation import EvaluateConfig, evaluate
    from gcsl.experiments.report import write_report
    from gcsl.generation.generate import GenerateConfig, generate
    from gcsl.methods import get_method

    variants = expand_variants(cfg)
    layout = ExperimentLayout(cfg.out)
    todo = [v for v in variants if not cfg.only or v.name in cfg.only]
    if cfg.report_only:
        # A report from a folder where some seeds have not finished: they are left out, never started.
        missing = [f"{v.name} seed {seed}" for v in todo for seed in v.seeds if not layout.evaluated_seed(v, seed)]
        if len(missing) == sum(len(v.seeds) for v in todo):  # an empty report would replace the one there
            raise StageError(f"{layout.root}: no variant has every evaluation recorded (runs/ or records/), so there "
                             "is nothing to report; run the experiment without --report-only")
        _say("report only: " + (f"left out, not finished: {', '.join(missing)}" if missing
                                else "every variant and seed is recorded"))
        todo = []
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(layout.experiment_json, {"config": config_to_dict(cfg), "versions": package_versions(),
                                               "variants": [v.__dict__ for v in variants]})
    # A report alone reads no training data: the split stays as the runs left it.
    split = None if cfg.report_only else split_validation(cfg)
    if split is not None:
        _say(f"validation split: {cfg.validation_prompts} prompts held out of training -> {split[1]}")
    # Seed-major order: every variant's first seed finishes before any second seed starts, so a
    # run cut short still has a complete comparison.
    jobs = sorted(((seed, i, v) for i, v in enumerate(todo) for seed in v.seeds), key=lambda j: (j[0], j[1]))
    for n, (seed, _, v) in enumerate(jobs, 1):
        _say(f"({n}/{len(jobs)}) {v.name}, seed {seed}")
        if layout.recorded_seed(v, seed):
            _say(f"  every evaluation is in {layout.relative(layout.root / 'records')}/: nothing to run")
            continue
        generator = _GENERATORS[get_method(v.method).variant_kind](cfg, layout, v, seed, split)
        setup = layout.goal_setup(v.name, seed)
        made: dict[tuple, Path] = {}  # resolved goal -> its generations, so one goal is sampled once
        for goal in layout.variant_goals(v):
            p = layout.stage(v.name, seed, goal)
            fresh = not p.metrics.exists()
            key = _resolved_goal(setup, goal)
            if fresh:
                earlier = made.get(key) if key is not None else None
                if earlier is not None and earlier.is_file():
                    # `top` and `level:K` often name the same goal: same text, same seed, same samples.
                    _say(f"  goal {goal} is the goal of {earlier.name}: reusing its samples")
                    _copy_generations(earlier, p.gens, goal)
                else:
                    gen = resolve_config(GenerateConfig, overrides={
                        **cfg.generate, **v.generate, **generator.generate, **_own_protocol(v.method),
                        "model": generator.model, "prompts": cfg.eval_prompts, "goal": goal, "seed": seed,
                        "out": p.gens})
                    if generator.write is not None:
                        _say(f"  write {v.method} generations (no model) -> {p.gens.name}")
                        generator.write(gen)
                    else:
                        _say(f"  generate at goal {goal} -> {p.gens.name}")
                        generate(gen)
                _say(f"  evaluate -> {p.metrics.name}")
                evaluate(resolve_config(EvaluateConfig, overrides={
                    "task": cfg.task, "generations": p.gens, "out": p.metrics,
                    "task_options": _evaluate_options(cfg, v.method), "ci_samples": cfg.ci_samples,
                    "overwrite": True}))
            _keep_items(p, cfg.task, fresh=fresh)
            if key is not None:
                made.setdefault(key, p.gens)
        layout.keep_records()
    report = write_report(cfg, variants)
    _say(f"report: {report}")
    return report
