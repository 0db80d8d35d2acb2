"""`gcsl prepare`: feedback log -> goal-conditioned training data (Parquet) + goals.json."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gcsl.config import field
from gcsl.data.load import FeedbackLog, column_numpy, read_feedback, validate_feedback
from gcsl.errors import ConfigError, DataError
from gcsl.goals import (
    Formulation,
    FormulationInput,
    GoalSetup,
    MetricSpec,
    Pairs,
    default_templates,
    quantize_feedback,
    retained_levels,
)
from gcsl.goals.aspects import Aspect, MultiGoalSetup, read_aspects
from gcsl.goals.formulate import (
    beyond_threshold,
    combination_levels,
    formulate_beyond_aspects,
    formulate_classic_aspects,
    per_level,
)
from gcsl.goals.render import ASPECT_SENTENCE, TEMPLATE_FIELDS, default_aspect_templates
from gcsl.methods import get_method, trained_methods
from gcsl.runinfo import atomic_dir, atomic_write_json, write_run_record

__all__ = ["PrepareConfig", "PrepareResult", "prepare", "Method"]

# The --method choices, taken from the method table (gcsl.methods) when this module loads.
Method = Literal[trained_methods()]  # type: ignore[valid-type]

_SLICE = 1 << 17


@dataclass
class PrepareConfig:
    data: str = field(help="feedback log: a .jsonl/.csv/.parquet file, a saved dataset folder, or a hub dataset name")
    out: Path = field(help="output directory (train.parquet, goals.json, run.json)")
    method: Method = field("gcsl-bey-nl", help="training-data construction method")
    prompt_column: str = field("prompt", help="column holding the prompt (text or chat messages)")
    response_column: str = field("response", help="column holding the logged response")
    score_column: str = field("score", help="column holding the feedback value")
    data_format: Literal["auto", "jsonl", "csv", "parquet", "hf"] = field("auto", help="input format (auto: from the extension)")
    split: str = field("train", help="split to read from a Hugging Face dataset")
    bins: int = field(5, help="number of equal-frequency bins K for scalar feedback")
    filter: bool = field(True, help="keep only goals whose threshold is above the training mean (--no-filter: the ablation)")
    sft_top: float = field(0.25, help="SFT keeps this top fraction of rows by score (sft-bottom: this bottom "
                                      "fraction)")
    sft_cutoff: float | None = field(None, help="SFT keeps rows with score >= this value instead of a top fraction")
    metric_name: str = field("score", help="what the feedback measures, as goals name it (e.g. toxicity, rating)")
    score_range: list[float] | None = field(None, flag="--range", nargs=2, help="LOW HIGH: the metric's range")
    lower_is_better: bool = field(False, help="lower feedback values are better (e.g. toxicity)")
    flip: bool = field(True, help="with --lower-is-better, flip scores (non-toxicity = 1 - toxicity); "
                                  "--no-flip phrases goals as 'below'")
    flipped_name: str | None = field(None, help="name of the flipped metric (default: non-<metric-name>)")
    kind: Literal["scalar", "ordinal", "categorical"] = field("scalar", help="feedback kind")
    categories: list[str] = field(default_factory=list, help="ordered categories, worst to best (--kind categorical)")
    max_levels: int = field(100, help="most levels --kind ordinal may make (one per whole value in the range); "
                                      "raise it only for a scale that really has that many steps")
    precision: int = field(2, help="decimals used to write thresholds in goals")
    best_meaning: str | None = field(None, help="what the best value means, e.g. 'the least toxicity'")
    subject: str = field("a response", help="what the goal asks for, e.g. 'a recommendation'")
    templates: dict | None = field(None, cli=False, help="NL templates by style (bey, snl, range, value) overriding "
                                                         "the defaults; fields: " + ", ".join(TEMPLATE_FIELDS))
    level_words: list[str] = field(default_factory=list, help="words naming the levels, lowest first, one per "
                                                              "bin (e.g. 'mixed' ... 'very negative'); templates "
                                                              "state them with {level_word}, beside the number")
    continuation: bool = field(False, help="prompts are the start of a text that the response continues "
                                           "(RealToxicityPrompts): the goal then goes before the text by default")
    placement: Literal["auto", "after", "before", "system"] = field(
        "auto", help="where the goal goes: after the user's prompt, before it, or as a system message; auto = "
                     "before for --continuation prompts (a goal after them would sit inside the text being "
                     "continued), else after")
    separator: str = field("\n\n", help="text between prompt and goal")
    aspects: list[dict | str] = field(
        default_factory=list, flag="--aspect",
        help="multi-aspect goals: one spec per feedback column, 'name=NAME,column=COL[,range=LOW:HIGH]"
             "[,direction=higher|lower|below][,kind=scalar|ordinal|categorical][,bins=K][,precision=P]"
             "[,categories=a|b|c][,words=a|b|c]' (words: one per bin, lowest first, for {level_word}; "
             "YAML: an aspects: list of mappings, which may add flipped_name, "
             "best_meaning and templates: clause templates by style plus 'detail'); replaces --score-column, "
             "--metric-name, --range, --lower-is-better, --kind, --bins; one aspect is the same as those options")
    conjunction: str = field(" and ", help="multi-aspect NL goals: text joining the aspects' clauses")
    aspect_sentence: str = field(ASPECT_SENTENCE, help="multi-aspect NL goals: the sentence holding the clauses; "
                                                       "fields {subject}, {goals} (the joined clauses), {details}")
    dpo_pairs: int = field(5, help="DPO: pairs per prompt with the largest score gaps")
    dpo_negatives: Literal["observed", "sampled"] = field(
        "observed", help="DPO: 'observed' pairs responses of the same prompt; 'sampled' pairs each top response "
                         "with responses of other prompts (for one-response-per-prompt logs)")
    seed: int = field(0, help="random seed (sampled DPO negatives)")
    overwrite: bool = field(False, help="replace an existing --out directory")
    quiet: bool = field(False, help="do not print the report")

    def validate(self) -> list[str]:
        problems = []
        if self.bins < 1:
            problems.append("bins: must be at least 1")
        if not 0 < self.sft_top <= 1:
            problems.append("sft_top: must be in (0, 1], e.g. 0.25")
        if self.score_range is not None and (len(self.score_range) != 2 or self.score_range[0] >= self.score_range[1]):
            problems.append("range: give LOW HIGH with LOW < HIGH")
        if self.lower_is_better and self.flip and self.score_range is None:
            problems.append("range: --lower-is-better with flipping needs --range LOW HIGH (non-x = high + low - x)")
        if self.kind == "categorical" and len(self.categories) < 2:
            problems.append("categories: --kind categorical needs at least two --categories, worst to best")
        if self.precision < 0:
            problems.append("precision: must be >= 0")
        if self.max_levels < 2:
            problems.append("max_levels: must be at least 2")
        elif self.kind == "ordinal" and self.score_range and len(self.score_range) == 2:
            count = int(np.floor(self.score_range[1]) - np.ceil(self.score_range[0])) + 1
            if count > self.max_levels:
                problems.append(f"range: --kind ordinal over --range {self.score_range[0]:g} {self.score_range[1]:g} "
                                f"makes {count} levels, more than --max-levels {self.max_levels}; use --kind scalar "
                                "(binned) or raise --max-levels")
        if self.templates:
            unknown = set(self.templates) - {"bey", "snl", "range", "value"}
            if unknown:
                problems.append(f"templates: unknown style(s) {', '.join(sorted(unknown))}; use bey, snl, range, value")
            for style, text in self.templates.items():
                try:
                    str(text).format(**{f: "x" for f in TEMPLATE_FIELDS})
                except (KeyError, IndexError, ValueError) as exc:
                    problems.append(f"templates.{style}: unknown field {exc} (fields: {', '.join(TEMPLATE_FIELDS)})")
        if self.score_range is None and self.kind != "categorical":
            for style, text in (self.templates or {}).items():
                used = [f for f in ("{low}", "{high}", "{best_value}") if f in str(text)]
                if used:
                    problems.append(f"templates.{style}: {', '.join(used)} need --range LOW HIGH (no range is "
                                    "known to state)")
        if _uses_level_word(self.templates) and not self.level_words:
            problems.append("templates: {level_word} needs --level-words, one word per bin, lowest first")
        if self.level_words and self.kind == "scalar" and len(self.level_words) != self.bins:
            problems.append(f"level_words: give one per bin, lowest first ({self.bins} for --bins {self.bins}), "
                            f"got {len(self.level_words)}")
        if self.level_words and self.kind != "scalar":
            problems.append(f"level_words: {self.kind} feedback names its levels already; drop --level-words")
        if self.dpo_pairs < 1:
            problems.append("dpo_pairs: must be at least 1")
        if self.aspects:
            aspects, aspect_problems = read_aspects(self.aspects)
            problems += aspect_problems
            problems += [f"aspect {a.name!r}: its templates state {{level_word}}; give it words=..., one per bin, "
                         "lowest first" for a in aspects
                         if _uses_level_word(a.templates) and not (a.words or self.level_words)]
            # Each aspect carries its own metric options; a top-level one would be silently ignored.
            defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                        for f in dataclasses.fields(self) if f.name in _ASPECT_OWNED}
            problems += [f"{name}: with --aspect, give it inside each aspect ({_ASPECT_OWNED[name]}=...)"
                         for name, default in defaults.items() if getattr(self, name) != default]
            if len(self.aspects) > 1 and self.level_words:
                problems.append("level_words: with several aspects give each aspect its own words (YAML "
                                "aspects[i].words: [...], CLI words=a|b|c), lowest level first")
            if len(self.aspects) > 1 and self.templates:
                problems.append("templates: with several aspects give clause templates inside each aspect "
                                "(aspects[i].templates)")
            if "{goals}" not in self.aspect_sentence:
                problems.append("aspect_sentence: must contain {goals}, where the aspects' clauses go")
        return problems

    def aspect_list(self) -> list[Aspect]:
        """The parsed aspects (empty without --aspect); call after :meth:`validate` passed."""
        return read_aspects(self.aspects)[0] if self.aspects else []

    def for_aspect(self, aspect: Aspect) -> PrepareConfig:
        """This config with one aspect written into the single-aspect options (identical output to giving those)."""
        low_high = None if aspect.low is None else [aspect.low, aspect.high]
        return dataclasses.replace(
            self, aspects=[], score_column=aspect.column, metric_name=aspect.name, score_range=low_high,
            lower_is_better=aspect.direction != "higher", flip=aspect.direction != "below", kind=aspect.kind,
            categories=list(aspect.categories), bins=aspect.bins, precision=aspect.precision,
            flipped_name=aspect.flipped_name, best_meaning=aspect.best_meaning,
            templates=aspect.templates or self.templates, level_words=list(aspect.words) or self.level_words)

    @property
    def goal_placement(self) -> str:
        """The placement after ``auto`` is resolved.

        >>> PrepareConfig(data="log.jsonl", out=Path("p"), continuation=True).goal_placement
        'before'
        """
        if self.placement != "auto":
            return self.placement
        return "before" if self.continuation else "after"

    def metric_spec(self) -> MetricSpec:
        low, high = self.score_range if self.score_range else (None, None)
        return MetricSpec(name=self.metric_name, low=low, high=high, higher_is_better=not self.lower_is_better,
                          flip=self.flip, flipped_name=self.flipped_name, precision=self.precision, kind=self.kind,
                          categories=tuple(self.categories), best_meaning=self.best_meaning, subject=self.subject)


# Single-aspect options an aspect spec replaces, with the aspect field that does.
_ASPECT_OWNED = {"score_column": "column", "metric_name": "name", "score_range": "range", "lower_is_better": "direction",
                 "flip": "direction", "kind": "kind", "categories": "categories", "bins": "bins",
                 "precision": "precision", "flipped_name": "flipped_name", "best_meaning": "best_meaning"}


@dataclass
class PrepareResult:
    out: Path
    setup: GoalSetup
    rows_in: int
    rows_out: int
    dropped: dict[str, int]
    notes: list[str]


def prepare(cfg: PrepareConfig) -> PrepareResult:
    """Reads and validates a feedback log, builds the method's training rows and writes them.

    >>> # gcsl prepare --data log.jsonl --method gcsl-bey-nl --out prepared/   (see the README)
    """
    method = get_method(cfg.method)
    if not method.trainable:
        what = (f"trains its adapters with {' and '.join(method.experts)}" if method.experts
                else "is a model-free baseline" if method.heuristic
                else "trains online on its own samples in `gcsl experiment`" if method.online or method.loop
                else "is the untrained model" if method.variant_kind == "base"
                else f"is made by `gcsl experiment` (variant kind {method.variant_kind})")
        raise ConfigError(f"method: {cfg.method} {what} and has no training data of its own; use one of "
                          f"{', '.join(trained_methods())}")
    if cfg.aspects:
        problems = cfg.validate()
        if problems:
            raise ConfigError("; ".join(problems))
        aspects = cfg.aspect_list()
        if len(aspects) > 1:
            return prepare_aspects(cfg, aspects)
        cfg = cfg.for_aspect(aspects[0])  # one aspect is exactly the single-aspect options
    spec = cfg.metric_spec()
    table, fmt = read_feedback(cfg.data, prompt_column=cfg.prompt_column, response_column=cfg.response_column,
                               score_column=cfg.score_column, fmt=cfg.data_format, split=cfg.split)
    log = validate_feedback(table, cfg.data, fmt, spec, bins=cfg.bins)
    _check_ordinal_levels(cfg, spec, column_numpy(log.table.column("score")))

    # quantize -> formulate -> render, all on numpy arrays indexed by row.
    oriented = spec.orient(column_numpy(log.table.column("score")))
    quant = quantize_feedback(oriented, spec, bins=cfg.bins)
    train_mean = float(oriented.mean())
    use_filter = cfg.filter and method.filtering
    retained = retained_levels(quant.thresholds, train_mean, filter_goals=use_filter)
    top_level = quant.levels == quant.levels.max()
    templates, range_notes = _templates(cfg, spec)
    setup = GoalSetup(
        method=cfg.method, metric=spec, thresholds=quant.thresholds, retained_levels=retained,
        train_mean=train_mean, bins_requested=cfg.bins, templates=templates, placement=cfg.goal_placement,
        separator=cfg.separator, top_bin_mean=float(oriented[top_level].mean()), score_max=float(oriented.max()),
        level_words=_level_words(cfg, quant),
    )
    notes = range_notes + list(quant.notes)
    if use_filter and not any(t > train_mean for t in quant.thresholds):
        notes.append("no threshold is above the training mean; only the top level is kept as a goal")

    prompt_text = _as_text_prompts(log)
    form = method.formulate(_formulation_input(cfg, spec, quant.levels, oriented, retained, prompt_text))
    if isinstance(form, Pairs):
        pair_table = _pair_table(cfg, log, oriented, form)
        batches, rows_out = iter([pair_table]), pair_table.num_rows
    else:
        # Output rows are built and written a slice at a time, so the expansion never sits in
        # memory whole (a 1M-row log expands to several hundred MB of goal-bearing prompts).
        batches = (_goal_table(cfg, log, setup, form, oriented, prompt_text, start, start + _SLICE)
                   for start in range(0, max(len(form.rows), 1), _SLICE))
        rows_out = len(form.rows)
    dropped = form.dropped

    counts = {
        "rows_in": log.num_rows,
        "rows_out": rows_out,
        "rows_per_level": {str(k): int(v) for k, v in zip(setup.levels, np.bincount(quant.levels, minlength=len(
            quant.thresholds) + 1)[1:])},
    }
    goals = setup.to_json() | {"counts": counts, "dropped": dropped, "notes": notes}
    _write_outputs(cfg, batches, goals)
    result = PrepareResult(Path(cfg.out), setup, log.num_rows, rows_out, dropped, notes)
    if not cfg.quiet:
        _print_report(result, goals)
    return result


def prepare_aspects(cfg: PrepareConfig, aspects: list[Aspect]) -> PrepareResult:
    """`gcsl prepare` with several aspects: each quantized and filtered on its own, one goal per row.

    Classic methods give each row the tuple of its levels; beyond methods give it one training row
    per combination of retained thresholds that it reaches in every aspect.
    """
    method = get_method(cfg.method)
    if method.formulate not in _ASPECT_FORMULATIONS:
        usable = [m for m in trained_methods() if get_method(m).formulate in _ASPECT_FORMULATIONS]
        raise ConfigError(f"method: {cfg.method} reads one score per row, so it cannot take several --aspect; use "
                          f"one of {', '.join(usable)}, or a single aspect")
    table, fmt = read_feedback(cfg.data, prompt_column=cfg.prompt_column, response_column=cfg.response_column,
                               score_column=aspects[0].column, fmt=cfg.data_format, split=cfg.split,
                               aspect_columns=tuple(a.column for a in aspects))
    use_filter = cfg.filter and method.filtering
    setups, levels, scores, notes, log = [], [], [], [], None
    for aspect in aspects:
        spec = aspect.spec(cfg.subject)
        # Each aspect is validated as a score column of its own; its errors say which aspect.
        view = table.select(["prompt", "response"]).append_column("score_raw", table.column(f"aspect:{aspect.column}"))
        aspect_cfg = cfg.for_aspect(aspect)
        try:
            aspect_log = validate_feedback(view, cfg.data, fmt, spec, bins=aspect.bins)
            _check_ordinal_levels(aspect_cfg, spec, column_numpy(aspect_log.table.column("score")))
            scores.append(column_numpy(aspect_log.table.column("score")))
            oriented = spec.orient(scores[-1])
            quant = quantize_feedback(oriented, spec, bins=aspect.bins)
            words = _level_words(aspect_cfg, quant, flags=("words", "bins"))
        except DataError as exc:
            raise DataError(f"aspect {aspect.name!r} (column {aspect.column!r}): {exc}") from None
        log = log or aspect_log
        train_mean = float(oriented.mean())
        retained = retained_levels(quant.thresholds, train_mean, filter_goals=use_filter)
        templates, range_notes = _templates(aspect_cfg, spec, default_aspect_templates(spec))
        setups.append(GoalSetup(
            method=cfg.method, metric=spec, thresholds=quant.thresholds, retained_levels=retained,
            train_mean=train_mean, bins_requested=aspect.bins, templates=templates, placement=cfg.goal_placement,
            separator=cfg.separator, top_bin_mean=float(oriented[quant.levels == quant.levels.max()].mean()),
            score_max=float(oriented.max()), level_words=words, extra={"column": aspect.column}))
        levels.append(quant.levels)
        notes += [f"{aspect.name}: {n}" for n in range_notes + list(quant.notes)]
        if use_filter and not any(t > train_mean for t in quant.thresholds):
            notes.append(f"{aspect.name}: no threshold is above the training mean; only the top level is kept")

    sizes = tuple(len(s.thresholds) for s in setups)
    level_table = np.stack(levels, axis=1)
    form = (formulate_beyond_aspects(level_table, tuple(s.retained_levels for s in setups), sizes)
            if method.beyond else formulate_classic_aspects(level_table, sizes))
    counts_by_id = np.bincount(form.goal_levels, minlength=int(np.prod(sizes)) + 1)
    setup = MultiGoalSetup(
        method=cfg.method, aspects=tuple(setups), conjunction=cfg.conjunction, sentence=cfg.aspect_sentence,
        placement=cfg.goal_placement, separator=cfg.separator,
        combination_counts={combination_levels(c, sizes): int(n) for c, n in enumerate(counts_by_id) if c and n})
    prompt_text = _as_text_prompts(log)
    batches = (_aspect_goal_table(cfg, log, setup, form, prompt_text, scores, start, start + _SLICE)
               for start in range(0, max(len(form.rows), 1), _SLICE))
    counts = {"rows_in": log.num_rows, "rows_out": len(form.rows),
              "rows_per_level": {s.metric.name: {str(k): int(v) for k, v in zip(s.levels, np.bincount(
                  lv, minlength=len(s.thresholds) + 1)[1:])} for s, lv in zip(setups, levels)}}
    goals = setup.to_json() | {"counts": counts, "dropped": form.dropped, "notes": notes}
    _write_outputs(cfg, batches, goals)
    result = PrepareResult(Path(cfg.out), setup, log.num_rows, len(form.rows), form.dropped, notes)
    if not cfg.quiet:
        _print_report(result, goals)
    return result


# Row selections that several aspects generalise (the others read one score per row).
_ASPECT_FORMULATIONS = (per_level, beyond_threshold)


def _write_outputs(cfg: PrepareConfig, batches, goals: dict) -> None:
    """train.parquet (a slice at a time), goals.json and run.json, all or nothing."""
    with atomic_dir(cfg.out, overwrite=cfg.overwrite) as tmp:
        writer = None
        for batch in batches:
            writer = writer or pq.ParquetWriter(tmp / "train.parquet", batch.schema, compression="zstd")
            writer.write_table(batch)
        writer.close()
        atomic_write_json(tmp / "goals.json", goals)
        write_run_record(tmp, stage="prepare", config=cfg, seed=cfg.seed, goals=goals)


# The defaults' sentence stating the metric's range; without --range there is no range to state.
_RANGE_SENTENCE = " {Metrics} range from {low} to {high}, with {best_value} indicating {best_meaning}."


def _templates(cfg: PrepareConfig, spec: MetricSpec,
               aspect_templates: dict[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """The NL templates, and a note when the range sentence is left out for want of --range.

    ``aspect_templates``: an aspect's clause templates, whose range sentence is their ``detail``.
    """
    templates = default_templates(spec) if aspect_templates is None else aspect_templates
    notes = []
    if spec.kind != "categorical" and cfg.score_range is None:
        templates = {k: t.replace(_RANGE_SENTENCE, "") for k, t in templates.items() if k != "detail"}
        notes.append("no --range given: goals leave out the sentence stating the metric's range; "
                     + ("pass --range LOW HIGH" if aspect_templates is None else "give the aspect range=LOW:HIGH")
                     + " to state it")
    return {**templates, **(cfg.templates or {})}, notes


def _check_ordinal_levels(cfg: PrepareConfig, spec: MetricSpec, scores: np.ndarray) -> None:
    """Refuses an ordinal scale with more than --max-levels levels (one per whole value in its range)."""
    if spec.kind != "ordinal" or cfg.score_range:  # a range's levels are checked with the config
        return
    low, high = float(scores.min()), float(scores.max())
    count = int(np.floor(high) - np.ceil(low)) + 1
    if count > cfg.max_levels:
        raise DataError(f"{cfg.data}: --kind ordinal over the scores from {low:g} to {high:g} makes {count} levels, "
                        f"more than --max-levels {cfg.max_levels}; pass --range LOW HIGH, use --kind scalar "
                        "(binned), fix the scores, or raise --max-levels")


def _uses_level_word(templates: dict | None) -> bool:
    """Whether any template states {level_word} (it then needs level words)."""
    return any("{level_word}" in str(t) for t in (templates or {}).values())


def _level_words(cfg: PrepareConfig, quant, flags: tuple[str, str] = ("--level-words", "--bins")) -> tuple[str, ...]:
    """The level words, checked against the bins actually used (ties can merge bins); ``flags`` name the
    words and bins options as the user gave them (an aspect's fields, or the command line's)."""
    if not cfg.level_words:
        return ()
    if len(cfg.level_words) != len(quant.thresholds):
        raise DataError(f"{cfg.data}: ties left {len(quant.thresholds)} bins, but {flags[0]} names "
                        f"{len(cfg.level_words)}; give {len(quant.thresholds)} words or fewer {flags[1]}")
    return tuple(cfg.level_words)


def _formulation_input(cfg: PrepareConfig, spec: MetricSpec, levels: np.ndarray, oriented: np.ndarray,
                       retained: tuple[int, ...], prompt_text: pa.ChunkedArray) -> FormulationInput:
    """What any method's formulation may read; the options are handed over whether it uses them or not."""
    groups = column_numpy(pc.dictionary_encode(prompt_text.combine_chunks()).indices)
    cutoff = None if cfg.sft_cutoff is None else float(spec.orient(np.array([cfg.sft_cutoff]))[0])
    return FormulationInput(levels=levels, oriented=oriented, groups=groups, retained=retained, sft_top=cfg.sft_top,
                            sft_cutoff=cutoff, pairs_per_group=cfg.dpo_pairs, negatives=cfg.dpo_negatives,
                            seed=cfg.seed)


def _as_text_prompts(log: FeedbackLog) -> pa.ChunkedArray:
    """The goal-free prompt as one string per row (chat prompts as their JSON)."""
    prompt = log.table.column("prompt")
    if not log.chat:
        return pc.cast(prompt, pa.string())
    return pa.chunked_array([pa.array([json.dumps(m, ensure_ascii=False, sort_keys=True)
                                       for m in prompt.to_pylist()], pa.string())])


def _goal_table(cfg: PrepareConfig, log: FeedbackLog, setup: GoalSetup, form: Formulation,
                oriented: np.ndarray, prompt_text: pa.ChunkedArray, start: int, stop: int) -> pa.Table:
    """Output rows ``start:stop`` of the formulation, with goals rendered and placed."""
    row_idx = form.rows[start:stop]
    rows = pa.array(row_idx, pa.int64())
    spec = setup.metric
    method = get_method(setup.method)
    style = method.goal_style
    has_goal = style is not None
    display = -oriented[row_idx] if spec.below else oriented[row_idx]

    # One goal string and threshold per level, gathered by each output row's level.
    if style == "value":
        goal = pa.array([setup.value_text(float(v)) for v in display], pa.string())
        level, threshold = pa.nulls(len(rows), pa.int32()), pa.nulls(len(rows), pa.float64())
    elif has_goal:
        level_idx = pa.array(form.goal_levels[start:stop], pa.int32())
        goal = pc.take(pa.array([None] + [setup.goal_text(k) for k in setup.levels], pa.string()), level_idx)
        threshold = pc.take(pa.array([None] + [setup.threshold_display(k) for k in setup.levels], pa.float64()),
                            level_idx)
        level = level_idx
    else:
        goal = pa.nulls(len(rows), pa.string())
        level = pa.nulls(len(rows), pa.int32())
        threshold = pa.nulls(len(rows), pa.float64())

    # The raw score as a number, for methods that read their goal through the goal embedding.
    goal_value = (pa.array(display, pa.float64()) if "goal_value" in method.columns
                  else pa.nulls(len(rows), pa.float64()))
    prompt, completion, reference_prompt = _placed(cfg, log, rows, goal, has_goal)
    return pa.table({
        "prompt": prompt,
        "completion": completion,
        "goal": goal,
        "goal_level": level,
        "threshold": threshold,
        "goal_value": goal_value,
        "row_id": rows,
        "score": pa.array(display, pa.float64()),
        "prompt_text": prompt_text.take(rows),
        "reference_prompt": reference_prompt,
    })


def _aspect_goal_table(cfg: PrepareConfig, log: FeedbackLog, setup: MultiGoalSetup, form: Formulation,
                       prompt_text: pa.ChunkedArray, scores: list[np.ndarray], start: int, stop: int) -> pa.Table:
    """Output rows ``start:stop`` of a multi-aspect formulation: ``goal_level`` is the combination id,
    ``aspect_levels`` / ``aspect_thresholds`` / ``aspect_scores`` hold each aspect's level, threshold and score."""
    row_idx = form.rows[start:stop]
    rows = pa.array(row_idx, pa.int64())
    ids = form.goal_levels[start:stop]
    has_goal = setup.style is not None
    # One goal string per combination id, gathered by each output row's id.
    count = int(np.prod(setup.sizes))
    goal = (pc.take(pa.array([None] + [setup.goal_text(c) for c in range(1, count + 1)], pa.string()),
                    pa.array(ids, pa.int32())) if has_goal else pa.nulls(len(rows), pa.string()))
    prompt, completion, reference_prompt = _placed(cfg, log, rows, goal, has_goal)
    levels = np.stack(np.unravel_index(ids - 1, setup.sizes), axis=1) + 1
    thresholds = np.stack([np.array([a.threshold_display(k) for k in a.levels])[levels[:, i] - 1]
                           for i, a in enumerate(setup.aspects)], axis=1)
    per_aspect = len(setup.aspects)

    def lists(values: np.ndarray, dtype: pa.DataType) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), dtype), per_aspect)

    return pa.table({
        "prompt": prompt,
        "completion": completion,
        "goal": goal,
        "goal_level": pa.array(ids, pa.int32()),
        "aspect_levels": lists(levels, pa.int32()),
        "aspect_thresholds": lists(thresholds, pa.float64()),
        "row_id": rows,
        "aspect_scores": lists(np.stack([s[row_idx] for s in scores], axis=1), pa.float64()),
        "prompt_text": prompt_text.take(rows),
        "reference_prompt": reference_prompt,
    })


def _placed(cfg: PrepareConfig, log: FeedbackLog, rows: pa.Array, goal: pa.Array, has_goal: bool):
    """Prompts with their goals in place, completions, and the prompts without goals (the KL reference's)."""
    source_prompt = log.table.column("prompt").take(rows)
    response = log.table.column("response").take(rows)
    prompt, completion = _place(cfg, log.chat, source_prompt, goal, response)
    # The prompt without its goal, in the same form: what the training KL's reference conditions on.
    reference_prompt = (_place(cfg, log.chat, source_prompt, pa.nulls(len(rows), pa.string()), response)[0]
                        if has_goal else prompt)
    return prompt, completion, reference_prompt


def _place(cfg: PrepareConfig, chat: bool, prompt: pa.ChunkedArray, goal: pa.Array, response: pa.ChunkedArray):
    """Prompt with its goal in place, and the completion in the matching (text or chat) form."""
    response = pc.cast(response, pa.string())
    placement = cfg.goal_placement
    if not chat and placement != "system":
        # Text prompts stay in Arrow: one vectorised concatenation (rows without a goal keep the prompt).
        prompt = pc.cast(prompt, pa.string())
        parts = (prompt, goal) if placement == "after" else (goal, prompt)
        joined = pc.binary_join_element_wise(*parts, cfg.separator, null_handling="skip")
        return joined, response
    from gcsl.goals.render import training_row

    # A chat dataset needs every prompt as messages, so goal-free rows are converted too.
    rows = [training_row(p, g, r, placement, cfg.separator, chat=True)
            for p, g, r in zip(prompt.to_pylist(), goal.to_pylist(), response.to_pylist())]
    return pa.array([p for p, _ in rows]), pa.array([c for _, c in rows])


def _pair_table(cfg: PrepareConfig, log: FeedbackLog, oriented: np.ndarray, pairs: Pairs) -> pa.Table:
    """The preference rows: prompt, chosen and rejected responses, and where each pair came from."""
    chosen, rejected, pair_type = pairs.chosen, pairs.rejected, pairs.pair_type
    if len(chosen) == 0 and pair_type == "observed":
        raise DataError(f"{cfg.data}: no prompt has two responses with different scores, so no DPO pairs exist; "
                        "pass --dpo-negatives sampled to pair with other prompts' responses")
    spec = cfg.metric_spec()
    prompt = log.table.column("prompt").take(pa.array(chosen))
    response = pc.cast(log.table.column("response"), pa.string())
    chosen_text = response.take(pa.array(chosen))
    rejected_text = response.take(pa.array(rejected))
    if log.chat:
        chosen_text = pa.array([[{"role": "assistant", "content": r}] for r in chosen_text.to_pylist()])
        rejected_text = pa.array([[{"role": "assistant", "content": r}] for r in rejected_text.to_pylist()])
    display = -oriented if spec.below else oriented
    return pa.table({
        "prompt": prompt,
        "chosen": chosen_text,
        "rejected": rejected_text,
        "pair_type": pa.array([pair_type] * len(chosen), pa.string()),
        "score_chosen": pa.array(display[chosen], pa.float64()),
        # A sampled negative was rated for another prompt: its score says nothing about this one.
        "score_rejected": pa.array(display[rejected] if pair_type == "observed" else [None] * len(rejected),
                                   pa.float64()),
        "row_id_chosen": pa.array(chosen, pa.int64()),
        "row_id_rejected": pa.array(rejected, pa.int64()),
    })


def _print_report(result: PrepareResult, goals: dict) -> None:
    lines = [f"gcsl prepare: {result.rows_in} feedback rows -> {result.rows_out} training rows ({result.setup.method})"]
    multi = isinstance(result.setup, MultiGoalSetup)
    for s in result.setup.aspects if multi else (result.setup,):
        fmt = s.metric.format_value
        indent = "    " if multi else "  "
        if multi:
            lines.append(f"  aspect {s.metric.name} (column {s.extra['column']}):")
        lines += [
            f"{indent}thresholds ({len(s.thresholds)} of {s.bins_requested} bins): "
            + ", ".join(f"tau_{k}={fmt(s.threshold_display(k))}" for k in s.levels),
            f"{indent}training mean {fmt(s.metric.display(s.train_mean))}; goals kept: "
            + ", ".join(str(k) for k in s.retained_levels),
        ]
    if multi:
        lines.append("  training rows per level combination: " + ", ".join(
            f"({','.join(map(str, k))})={n}" for k, n in sorted(result.setup.combination_counts.items())))
    lines += [f"  dropped {n} rows: {why}" for why, n in result.dropped.items()]
    lines += [f"  note: {n}" for n in result.notes]
    top = goals.get("inference_goal") or {}
    if top.get("text"):
        lines.append(f"  inference goal (top): {top['text']}")
    lines.append(f"  wrote {result.out}/train.parquet, goals.json, run.json")
    print("\n".join(lines), file=sys.stderr)
