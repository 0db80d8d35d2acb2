"""One experiment's folder: where every variant's stage files live, and how they are read.

The runner writes through this layout, and the report, plots and quickstart read through it, so
a variant's files are found whatever its name (a sweep variant such as ``gcsl-bey-nl[bins=3]``
is a folder ``gcsl-bey-nl_bins=3``). Imports go one way: runner -> report -> plots -> layout.

Layout under ``root``::

    runs/<variant>/prepared/                 gcsl prepare output (shared by the seeds)
    runs/<variant>/seed<k>/model/            gcsl train output (an online variant's, grpo / rloo: its adapter
                                             trained by gcsl.training.online, no prepared/ folder)
    runs/<variant>/seed<k>/loop/             an online loop variant's rounds (online-gcsl-bey-nl: each round's
                                             pool, prepared data and model; gcsl.training.online_loop); its
                                             final model, the last round's, is seed<k>/model/
    runs/<variant>/seed<k>/probe/            goal-sensitivity probe on the validation prompts (trained and loop
                                             variants with goals to compare)
    runs/<variant>/seed<k>/gens-<goal>.jsonl gcsl generate output, one file per goal request (a multi-aspect
                                             request names every aspect: gens-sentiment_level_1_brevity_level_2)
    runs/<variant>/seed<k>/metrics-<goal>.json
    runs/<variant>/<role>/prepared/          a decoding-time variant's (dexperts) expert and anti-expert:
    runs/<variant>/seed<k>/<role>/           their prepare and train outputs (role: expert, anti-expert)
    items/<variant>/seed<k>/<goal>.jsonl     per-generation completion and scores (small; kept
                                             with the report so anyone can re-score them)
    probe/<variant>/seed<k>/probe.{json,png} copies of the probe's result and heatmap
    records/<variant>/...                    the small stage records of runs/ at the same paths: prepared
                                             goals.json, each seed's metrics-<goal>.json and probe rows, and its
                                             models' run.json, train_metrics.json, rounds.json and goals.json
    train_feedback.jsonl, validation.jsonl   the feedback split by prompt (validation_prompts > 0)
    report.md, results.csv, results.json, *.png, experiment.json (resolved config + versions); a
    multi-aspect variant's heatmaps are heatmap-<variant>-<metric>.png

Only ``runs/`` holds large files (adapters, checkpoints); everything else is small enough to
commit. ``records/`` is what the report reads from ``runs/``, kept beside it: a clone without ``runs/``
still writes the same report, and a seed whose every evaluation is recorded is not run again, so an
experiment can grow (more seeds, more variants) over sittings on machines that keep nothing but the
committed folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gcsl.errors import StageError
from gcsl.runinfo import atomic_path

if TYPE_CHECKING:
    from gcsl.goals import GoalSetup

__all__ = ["TRAINED", "GRID", "RECORDED", "EXPERT_ROLES", "Variant", "StagePaths", "ExpertPaths", "ExperimentLayout",
           "display_path", "training_data", "read_json", "slug", "is_multi_aspect", "aspect_grid",
           "configured_aspects"]

# Goal-curve keyword: the goals the variant was trained on, one `level:K` per trained level (a multi-aspect
# variant: one request per level combination that has training rows).
TRAINED = "trained"
# Goal-curve keyword: every combination of each aspect's trained levels (retained levels with goal
# filtering, all levels without), trained together or not; for one aspect the same as `trained`.
GRID = "grid"


# The stage files kept in records/ (relative to runs/): everything the report and the stage skipping read,
# nothing large. A model folder's files are recorded for trained models, online adapters, loops' final models,
# a decoding variant's expert adapters and the adapter an unlearning variant erases from (``full``).
_MODEL_RECORDS = ("run.json", "train_metrics.json", "rounds.json", "goals.json")
RECORDED = ("*/prepared/goals.json", "*/*/prepared/goals.json", "*/seed*/metrics-*.json",
            "*/seed*/probe/rows.jsonl", "*/seed*/probe/*/rows.jsonl",
            *(f"*/seed*/{folder}/{name}" for folder in ("model", "expert", "anti-expert", "full")
              for name in _MODEL_RECORDS))


@dataclass
class Variant:
    """One configuration of the experiment: a method plus overrides of the shared stage options."""

    name: str
    method: str
    prepare: dict[str, Any]
    train: dict[str, Any]
    generate: dict[str, Any]
    seeds: list[int]
    goals: list[str]
    # The goal-following curve's requests as configured (may hold `trained`); `goals` is "top"
    # followed by these. Statistics over the curve use these, not the extra "top".
    curve: list[str] = dc_field(default_factory=list)
    # An online loop variant's own LoopConfig options (over the experiment's `loop` block).
    loop: dict[str, Any] = dc_field(default_factory=dict)
    # A recipe variant's own RecipeConfig options (over the experiment's `recipe` block).
    recipe: dict[str, Any] = dc_field(default_factory=dict)


@dataclass(frozen=True)
class StagePaths:
    """Every file of one variant, seed and goal request."""

    prepared: Path
    model: Path
    gens: Path
    metrics: Path
    eval_items: Path  # the evaluation's per-generation scores, beside its metrics (in runs/)
    items: Path  # their small copy kept with the report
    probe: Path
    probe_out: Path


# The two adapters a DExperts variant trains, by role: the expert's, then the anti-expert's.
EXPERT_ROLES = ("expert", "anti-expert")


@dataclass(frozen=True)
class ExpertPaths:
    """One adapter of a decoding-time variant: its prepared data (shared by the seeds) and its model."""

    prepared: Path
    model: Path


# Longer slugs are cut and end in a hash of the full name: a many-aspect goal request must still fit
# a file name (255 bytes on common file systems, with room for the gens-/metrics- prefixes).
_SLUG_MAX = 120


def slug(text: str) -> str:
    """A file-name-safe form of a variant or goal name, the same on every run.

    >>> slug("gcsl-bey-nl[bins=3]"), slug("scale:1.12"), slug("negative sentiment=level:4,brevity=level:5")
    ('gcsl-bey-nl_bins_3', 'scale_1.12', 'negative_sentiment_level_4_brevity_level_5')
    """
    safe = re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")
    if len(safe) <= _SLUG_MAX:
        return safe
    return f"{safe[:_SLUG_MAX - 13]}_{hashlib.sha256(text.encode('utf-8')).hexdigest()[:12]}"


def is_multi_aspect(setup: Any) -> bool:
    """Whether a prepared variant's goals have several aspects (a MultiGoalSetup)."""
    return hasattr(setup, "aspects")


def aspect_grid(setup: Any, *, trained_only: bool = False) -> list[str]:
    """A multi-aspect variant's goal requests, one per level combination, the first aspect varying slowest:
    every combination of the aspects' trained levels, or (``trained_only``) those with training rows.

    Each request names every aspect (``name=level:K,...``), so the file names it makes are stable.
    """
    import itertools

    combos = itertools.product(*(a.trained_levels for a in setup.aspects))
    if trained_only:
        combos = (c for c in combos if setup.combination_counts.get(tuple(c), 0) > 0)
    return [",".join(f"{name}=level:{k}" for name, k in zip(setup.names, c)) for c in combos]


def _dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


@dataclass(frozen=True)
class ExperimentLayout:
    """The experiment folder ``root``: paths of every stage file and the typed readers of them."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # -- experiment-wide files -----------------------------------------------------------------
    @property
    def train_feedback(self) -> Path:
        return self.root / "train_feedback.jsonl"

    @property
    def validation(self) -> Path:
        return self.root / "validation.jsonl"

    @property
    def experiment_json(self) -> Path:
        return self.root / "experiment.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def results_json(self) -> Path:
        return self.root / "results.json"

    @property
    def results_csv(self) -> Path:
        return self.root / "results.csv"

    def prepared_folders(self) -> list[Path]:
        """Every variant's prepare output that has finished (its goals.json written last)."""
        runs = self.root / "runs"
        return sorted(p.parent for pattern in ("*/prepared/goals.json", "*/*/prepared/goals.json")
                      for p in runs.glob(pattern))

    def trained_on_split(self) -> list[Path]:
        """Everything made from the training split: prepare outputs, and finished models of variants
        that train without one (online methods sample their own rows from its prompts)."""
        runs = self.root / "runs"
        return sorted({*self.prepared_folders(), *(p.parent for p in runs.glob("*/seed*/model/run.json"))})

    # -- records of runs/ -----------------------------------------------------------------------
    def found(self, path: Path) -> Path:
        """A stage file or folder under runs/ where it is, else its record when there is one (a clone without
        runs/), else ``path`` itself (not made yet)."""
        path = Path(path)
        if path.exists():
            return path
        try:
            kept = self.root / "records" / path.relative_to(self.root / "runs")
        except ValueError:
            return path
        return kept if kept.exists() else path

    def keep_records(self) -> int:
        """Copies every finished stage record (:data:`RECORDED`) from runs/ into records/ where the copy is missing
        or differs; returns how many were written."""
        runs, written = self.root / "runs", 0
        for pattern in RECORDED:
            for src in runs.glob(pattern):
                dst = self.root / "records" / src.relative_to(runs)
                data = src.read_bytes()
                if dst.is_file() and dst.read_bytes() == data:
                    continue
                dst.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(dst) as tmp:
                    tmp.write_bytes(data)
                written += 1
        return written

    def recorded_seed(self, v: Variant, seed: int) -> bool:
        """Whether a seed of ``v`` needs nothing run: its runs/ folder is absent (a fresh clone) and every
        evaluation it makes is recorded."""
        return not (self.root / "runs" / slug(v.name) / f"seed{seed}").exists() and self.evaluated_seed(v, seed)

    def evaluated_seed(self, v: Variant, seed: int) -> bool:
        """Whether every evaluation a seed of ``v`` makes has finished, in runs/ or in records/."""
        goals = self.variant_goals(v)
        return bool(goals) and all(self.metrics(v.name, seed, g) is not None for g in goals)

    # -- per variant ---------------------------------------------------------------------------
    def stage(self, variant: str, seed: int = 0, goal: str = "top") -> StagePaths:
        """The one place that maps a variant, seed and goal request to files."""
        from gcsl.evaluation import output_paths

        base = self.root / "runs" / slug(variant)
        run = base / f"seed{seed}"
        metrics = run / f"metrics-{slug(goal)}.json"
        kept = Path(slug(variant)) / f"seed{seed}"
        return StagePaths(prepared=base / "prepared", model=run / "model", gens=run / f"gens-{slug(goal)}.jsonl",
                          metrics=metrics, eval_items=output_paths(metrics)[0],
                          items=self.root / "items" / kept / f"{slug(goal)}.jsonl", probe=run / "probe",
                          probe_out=self.root / "probe" / kept)

    def expert(self, variant: str, role: str, seed: int = 0) -> ExpertPaths:
        """Where a decoding-time variant's ``role`` adapter (one of :data:`EXPERT_ROLES`) is prepared and trained.

        Outside ``stage(variant).prepared``, so the variant itself stays goal-free and model-free to the
        report (its training facts are its adapters', not listed with the trained variants).
        """
        if role not in EXPERT_ROLES:
            raise ValueError(f"role must be one of {EXPERT_ROLES}, got {role!r}")
        base = self.root / "runs" / slug(variant)
        return ExpertPaths(prepared=base / role / "prepared", model=base / f"seed{seed}" / role)

    def loop(self, variant: str, seed: int = 0) -> Path:
        """Where an online loop variant's rounds are kept (its final model is ``stage(variant, seed).model``)."""
        return self.root / "runs" / slug(variant) / f"seed{seed}" / "loop"

    def goal_setup(self, variant: str, seed: int | None = None) -> GoalSetup | None:
        """The variant's goals as prepared (the one way goals.json is read here); None before prepare.

        An online loop variant prepares in each seed's loop folder instead: its goals are those of its final
        model (the last round's), of ``seed`` or, without one, of its first seed whose loop has finished.
        """
        from gcsl.goals import GoalSetup
        from gcsl.stages import ModelFolder

        prepared = self.found(self.stage(variant).prepared)
        try:
            return GoalSetup.load(prepared)
        except StageError:
            if (prepared / "goals.json").is_file():
                raise  # a goals file that is there but unreadable is an error, not "not prepared"
        seeds = [seed] if seed is not None else sorted(
            {int(p.name[4:]) for top in ("runs", "records") for p in (self.root / top / slug(variant)).glob("seed*")
             if p.name[4:].isdigit()})
        for k in seeds:
            model = ModelFolder(self.found(self.stage(variant, k).model))
            # a loop's final model holds its goals; an online adapter's (grpo, rloo) has none
            if model.state == "complete" and (setup := model.goal_setup()) is not None:
                return setup
        return None

    def _expand(self, v: Variant, goals: list[str]) -> list[str]:
        setup = self.goal_setup(v.name) if {TRAINED, GRID} & set(goals) else None
        if setup is None:
            keywords: dict[str, list[str]] = {TRAINED: [], GRID: []}
        elif is_multi_aspect(setup):
            keywords = {TRAINED: aspect_grid(setup, trained_only=True), GRID: aspect_grid(setup)}
        else:
            keywords = dict.fromkeys((TRAINED, GRID), [f"level:{k}" for k in setup.trained_levels])
        return _dedupe(g for goal in goals for g in keywords.get(goal, [goal]))

    def variant_goals(self, v: Variant) -> list[str]:
        """Every goal request the variant is generated at, `trained` expanded after prepare."""
        return self._expand(v, v.goals)

    def curve_goals(self, v: Variant) -> list[str]:
        """The variant's goal-following curve, `trained` expanded (empty without a curve)."""
        return self._expand(v, v.curve)

    def metrics(self, variant: str, seed: int, goal: str) -> dict[str, Any] | None:
        """A finished evaluation's METRICS.json, or None when that evaluation has not run."""
        return read_json(self.found(self.stage(variant, seed, goal).metrics))

    def relative(self, path: Path) -> str:
        """``path`` as the report names it: relative to the experiment folder."""
        return Path(path).relative_to(self.root).as_posix()


def configured_aspects(cfg: Any) -> list[Any]:
    """The aspects (gcsl.goals.Aspect) an experiment's prepare blocks name: the shared block's, then each
    variant's own, each name once; empty for single-aspect experiments. Problems in them are prepare's to
    report (ExperimentConfig validates the prepare blocks)."""
    from gcsl.goals.aspects import read_aspects

    blocks = [cfg.prepare, *(v.get("prepare") or {} for v in cfg.variants)]
    named: dict[str, Any] = {}
    for block in blocks:
        for aspect in read_aspects(block.get("aspects") or [])[0]:
            named.setdefault(aspect.name, aspect)
    return list(named.values())


def training_data(cfg: Any) -> str:
    """The feedback log prepare reads: the experiment's data less the validation prompts, if any."""
    return str(ExperimentLayout(cfg.out).train_feedback) if cfg.validation_prompts > 0 else str(cfg.data)


def read_json(path: Path) -> dict[str, Any] | None:
    """A small JSON stage file, or None when it does not exist (yet)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise StageError(f"{path}: not valid JSON ({exc}); delete it to redo that stage") from None


def display_path(path: str | Path) -> str:
    """A file as a report should name it: relative to the working directory when inside it, a
    packaged resource as ``gcsl:<path in the package>``, anything else as given.

    Reports are committed and read on other machines, where this machine's absolute paths mean
    nothing.

    >>> display_path(Path.cwd() / "data" / "log.jsonl")
    'data/log.jsonl'
    """
    import gcsl

    text = str(path)
    p = Path(text)
    if not p.is_absolute():
        return p.as_posix()
    package = Path(gcsl.__file__).resolve().parent
    for base, prefix in ((Path.cwd().resolve(), ""), (package, "gcsl:")):
        try:
            return prefix + p.resolve().relative_to(base).as_posix()
        except ValueError:
            continue
    return os.fspath(p)
