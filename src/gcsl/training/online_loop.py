"""Online GCSL: rounds of sample -> score -> pool -> re-quantize -> re-expand -> train the same adapter further.

The paper names online GCSL-bey-NL "in a manner similar to Quark" as future work; this is that loop,
built from the package's own stages, so any offline method of the table can run in it
(:attr:`gcsl.methods.Method.loop` names it; ``online-gcsl-bey-nl`` runs ``gcsl-bey-nl``).

One workflow, :func:`run_online_loop`, read top to bottom:

- round 0: the feedback log is the pool; `gcsl prepare` it with ``method`` and `gcsl train` a fresh
  adapter on it;
- round r >= 1: `gcsl generate` ``samples_per_round`` completions with round r-1's model at ``goal``
  (``top``, or ``scale:F``) on the pool's distinct prompts (cycled, one sample each, so every prompt is
  sampled as evenly as the count allows); score them with the task's reward hook (the evaluator's own
  per-generation score, :func:`gcsl.training.online.task_reward`); add the (prompt, response, score)
  rows to the pool (``pool: keep_all``, or ``window``: the last ``window`` rows); prepare the pool
  again, so the equal-frequency thresholds move with the model; and train round r-1's adapter further
  (``init_adapter``) for ``epochs_per_round`` or ``steps_per_round`` on the new rows. Each round's
  optimizer and learning-rate schedule start afresh.

The pool mixes the log's scores with the scorer's, so the log must be scored in the scorer's units
(the sentiment task's logs are VADER scores in [0, 1]).

Files under ``out``, each written atomically or resumably, so a re-run resumes at the first
unfinished round and inside it at the first unfinished stage. A re-run with more ``rounds`` than
rounds.json records goes on from the last finished round (the final model moves on to the new last
round's); one with fewer is refused, as a loop does not go back to an earlier round::

    loop.json                      the settings the rounds were made with (a re-run with others is refused)
    prompts.jsonl                  the pool's distinct prompts ({id, prompt})
    round-<r>/samples-prompts.jsonl, samples.jsonl, scored.jsonl    (r >= 1) what was sampled and scored
    round-<r>/pool.jsonl           the pool the round prepared (prompt, response, score)
    round-<r>/prepared/            gcsl prepare output
    round-<r>/model/               gcsl train output
    round-<r>/round.json           the round's record, written last: the round is finished
    rounds.json                    every finished round's record
    model/                         the final model: the last round's, plus rounds.json (``model_out``)

The final model folder is a normal `gcsl train` output (adapter, tokenizer, goals.json of the last
round, run.json with a ``rounds`` list), so `gcsl generate`, the probe and the report read it as any
trained GCSL model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gcsl.config import config_to_dict, field, resolve_config
from gcsl.errors import ConfigError, DataError, StageError
from gcsl.models import DEFAULT_MODEL
from gcsl.runinfo import atomic_write_json
from gcsl.stages import ModelFolder, iter_jsonl, write_jsonl

__all__ = ["LoopConfig", "run_online_loop", "read_rounds", "loop_problems", "ROUND_FACTS", "OWNED_OPTIONS"]

# The per-round facts rounds.json records (beside the round number).
ROUND_FACTS = ("thresholds", "thresholds_display", "retained_levels", "pool_rows", "samples", "mean_sample_score",
               "scorer_calls", "train_rows", "optimizer_steps", "epochs", "train_tokens", "train_seconds", "wall_seconds")
# Options the loop sets itself in each stage; an option block may not set them.
OWNED_OPTIONS = {"prepare": ("data", "out", "method", "overwrite", "prompt_column", "response_column", "score_column",
                    "data_format", "split"),
        "train": ("data", "out", "model", "seed", "init_adapter", "resume", "overwrite", "epochs", "max_steps"),
        "generate": ("model", "prompts", "out", "goal", "seed", "num_samples", "limit", "id_field", "prompt_field",
                     "expert", "anti_expert", "rank_catalogue")}


@dataclass
class LoopConfig:
    data: str = field(help="feedback log (JSONL/CSV/Parquet/dataset): round 0's pool; its distinct prompts are the "
                           "prompts every round samples")
    out: Path = field(help="loop folder: each round's pool, prepared data and model, rounds.json, the final model")
    model: str = field(DEFAULT_MODEL, help="base model: a built-in name, a local folder or a hub id")
    method: str = field("gcsl-bey-nl", help="offline method of the table each round prepares and trains with")
    task: str = field("sentiment", help="task whose scorer scores the samples (one with a reward hook: sentiment)")
    task_options: dict = field(default_factory=dict, cli=False, help="the task's evaluator options (e.g. direction)")
    rounds: int = field(2, help="rounds after round 0 (which trains on the log alone)")
    samples_per_round: int = field(32, help="completions sampled and scored per round, over the prompts in turn")
    pool: Literal["keep_all", "window"] = field("keep_all", help="keep every row, or only the last `window` rows")
    window: int | None = field(None, help="rows the pool keeps with pool: window")
    goal: str = field("top", help="goal the samples are drawn at: top or scale:<factor>")
    epochs_per_round: float = field(1.0, help="passes over each round's prepared data")
    steps_per_round: int = field(-1, help="optimizer steps per round; > 0 overrides epochs_per_round")
    prompt_column: str = field("prompt", help="prompt column of the feedback log")
    response_column: str = field("response", help="response column of the feedback log")
    score_column: str = field("score", help="score column of the feedback log")
    data_format: str = field("auto", help="feedback log format: auto, jsonl, csv, parquet or dataset")
    split: str = field("train", help="dataset split, for a datasets-hub log")
    seed: int = field(0, help="random seed (training; round r samples with seed + r)")
    prepare: dict = field(default_factory=dict, cli=False, help="PrepareConfig options of every round (bins, range...)")
    train: dict = field(default_factory=dict, cli=False, help="TrainConfig options of every round (LoRA, lr...)")
    generate: dict = field(default_factory=dict, cli=False, help="GenerateConfig options of the sampling "
                                                                 "(max_new_tokens, temperature, batch_size...)")
    model_out: Path | None = field(None, help="where the final model goes (default: OUT/model)")

    def validate(self) -> list[str]:
        from gcsl.methods import METHODS

        problems = []
        if self.method not in METHODS or not METHODS[self.method].trainable:
            problems.append(f"method: {self.method!r} is not a method `gcsl prepare` / `gcsl train` make")
        if self.rounds < 0:
            problems.append(f"rounds: must be >= 0, got {self.rounds}")
        if self.samples_per_round < 1:
            problems.append(f"samples_per_round: must be at least 1, got {self.samples_per_round}")
        if self.pool == "window" and (self.window is None or self.window < 1):
            problems.append("window: pool: window needs window >= 1 (the rows the pool keeps)")
        if self.pool == "keep_all" and self.window is not None:
            problems.append("window: only pool: window uses it; drop it or set pool: window")
        kind, sep, arg = self.goal.partition(":")
        if self.goal != "top":
            try:
                ok = sep and kind == "scale" and math.isfinite(float(arg)) and float(arg) > 0
            except ValueError:
                ok = False
            if not ok:
                problems.append(f"goal: use top or scale:<factor> (e.g. scale:1.1), got {self.goal!r}")
        if not self.epochs_per_round > 0:
            problems.append(f"epochs_per_round: must be positive, got {self.epochs_per_round}")
        if self.steps_per_round == 0 or self.steps_per_round < -1:
            problems.append(f"steps_per_round: must be positive (or -1 to use epochs_per_round), got "
                            f"{self.steps_per_round}")
        for stage, block in (("prepare", self.prepare), ("train", self.train), ("generate", self.generate)):
            if not isinstance(block, dict):
                problems.append(f"{stage}: expected a mapping of options, got {block!r}")
                continue
            owned = sorted(set(block) & set(OWNED_OPTIONS[stage]))
            if owned:
                problems.append(f"{stage}: the loop sets {', '.join(owned)} itself; drop them")
        return problems

    @property
    def final(self) -> Path:
        return Path(self.model_out) if self.model_out is not None else Path(self.out) / "model"


@dataclass(frozen=True)
class _Round:
    """One round's files."""

    root: Path

    @property
    def gen_prompts(self) -> Path:
        return self.root / "samples-prompts.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples.jsonl"

    @property
    def scored(self) -> Path:
        return self.root / "scored.jsonl"

    @property
    def pool(self) -> Path:
        return self.root / "pool.jsonl"

    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def record(self) -> Path:
        return self.root / "round.json"


def read_rounds(folder: Path) -> list[dict[str, Any]] | None:
    """The rounds.json of a loop's final model folder (or loop folder); None when there is none."""
    path = Path(folder) / "rounds.json"
    if not path.is_file():
        return None
    try:
        return list(json.loads(path.read_text(encoding="utf-8"))["rounds"])
    except (ValueError, KeyError, TypeError) as exc:
        raise StageError(f"{path}: not a rounds record ({exc}); delete it to redo the loop's last step") from None


def run_online_loop(cfg: LoopConfig) -> Path:
    """Runs (or resumes) the loop; returns the final model folder.

    >>> run_online_loop(LoopConfig(data="fb.jsonl", out=Path("runs/loop"), rounds=2))  # doctest: +SKIP
    PosixPath('runs/loop/model')
    """
    from gcsl.training.online import task_reward

    out = Path(cfg.out)
    score = task_reward(cfg.task, cfg.task_options)  # a task without a scorer fails before anything runs
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(cfg, out / "loop.json")
    done = read_rounds(out) or []
    if len(done) > cfg.rounds + 1:
        raise ConfigError(f"rounds: {out} already holds {len(done) - 1} rounds after round 0, more than rounds: "
                          f"{cfg.rounds}; set rounds to at least {len(done) - 1}, or choose another out to start anew")
    prompts = _write_prompts(cfg, out / "prompts.jsonl")
    records: list[dict[str, Any]] = []
    for r in range(cfg.rounds + 1):
        here = _Round(out / f"round-{r}")
        if here.record.is_file():
            records.append(json.loads(here.record.read_text(encoding="utf-8")))
            continue
        records.append(_run_round(cfg, r, here, _Round(out / f"round-{r - 1}") if r else None, prompts, score))
        atomic_write_json(out / "rounds.json", {"method": cfg.method, "rounds": records})
    if read_rounds(out) != records:
        atomic_write_json(out / "rounds.json", {"method": cfg.method, "rounds": records})
    return _write_final(cfg, _Round(out / f"round-{cfg.rounds}").model, records)


def _say(msg: str) -> None:
    import sys

    print(f"[gcsl online-loop {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _check_settings(cfg: LoopConfig, path: Path) -> None:
    """Cached rounds are only reused under the settings that made them (more or fewer rounds excepted)."""
    now = {k: v for k, v in config_to_dict(cfg).items() if k not in ("rounds", "model_out")}
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in {*now, *before} if before.get(k) != now.get(k))
        if changed:
            raise ConfigError(f"{path}: the rounds in {path.parent} were made with other settings ({', '.join(changed)} "
                              "differ); choose another out, or delete it to start over")
    else:
        atomic_write_json(path, now)


def _write_prompts(cfg: LoopConfig, path: Path) -> list[dict[str, Any]]:
    """The log's distinct prompts in first-seen order, written once (every round samples these)."""
    if path.is_file():
        return [row for _, row in iter_jsonl(path, "prompts")]
    seen: dict[str, Any] = {}
    for row in _log_rows(cfg):
        prompt = row["prompt"]
        seen.setdefault(prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True), prompt)
    if not seen:
        raise DataError(f"{cfg.data}: no prompts in column {cfg.prompt_column!r}; the loop samples the log's prompts")
    rows = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(seen.values())]
    write_jsonl(path, rows)
    return rows


def _log_rows(cfg: LoopConfig) -> list[dict[str, Any]]:
    """The feedback log as pool rows: prompt, response and the score as logged."""
    from gcsl.data.load import read_feedback

    table, _ = read_feedback(cfg.data, prompt_column=cfg.prompt_column, response_column=cfg.response_column,
                             score_column=cfg.score_column, fmt=cfg.data_format, split=cfg.split)
    return [{"prompt": r["prompt"], "response": r["response"], "score": r["score_raw"]} for r in table.to_pylist()
            if r["prompt"] is not None and not (isinstance(r["prompt"], str) and not r["prompt"].strip())]


def _run_round(cfg: LoopConfig, r: int, here: _Round, before: _Round | None, prompts: list[dict[str, Any]],
               score) -> dict[str, Any]:
    started = time.perf_counter()
    here.root.mkdir(parents=True, exist_ok=True)
    sampled: dict[str, Any] = {"samples": 0, "mean_sample_score": None, "scorer_calls": 0}
    if before is None:
        if not here.pool.is_file():
            write_jsonl(here.pool, _log_rows(cfg))
    else:
        new_rows = _sample_and_score(cfg, r, here, before, prompts, score)
        sampled = {"samples": len(new_rows), "scorer_calls": len(new_rows),
                   "mean_sample_score": sum(row["score"] for row in new_rows) / len(new_rows)}
        if not here.pool.is_file():
            pool = [row for _, row in iter_jsonl(before.pool, "pool")] + new_rows
            if cfg.pool == "window":
                pool = pool[-cfg.window:]
            write_jsonl(here.pool, pool)
    _prepare(cfg, r, here)
    facts = _train(cfg, r, here, before)
    from gcsl.goals import GoalSetup

    setup = GoalSetup.load(here.prepared)
    pool_rows = sum(1 for _ in iter_jsonl(here.pool, "pool"))
    # thresholds: oriented (larger is better, as quantized); thresholds_display: the metric's own units, as goals
    # state them and the scorer reports the samples' scores.
    record = {"round": r, "thresholds": [float(t) for t in setup.thresholds],
              "thresholds_display": [float(setup.threshold_display(k)) for k in setup.levels],
              "retained_levels": list(setup.retained_levels), "pool_rows": pool_rows, **sampled, **facts,
              "wall_seconds": round(time.perf_counter() - started, 3)}
    atomic_write_json(here.record, record)  # last: the round is finished
    _say(f"round {r}: pool {pool_rows} rows, thresholds {[round(t, 3) for t in record['thresholds_display']]}, "
         f"retained levels {list(setup.retained_levels)}"
         + (f", samples' mean score {sampled['mean_sample_score']:.3f}" if sampled["samples"] else ""))
    return record


def _sample_and_score(cfg: LoopConfig, r: int, here: _Round, before: _Round, prompts: list[dict[str, Any]],
                      score) -> list[dict[str, Any]]:
    """Round r's new pool rows: samples of round r-1's model on the prompts in turn, each scored once (cached)."""
    if here.scored.is_file():
        return [row for _, row in iter_jsonl(here.scored, "scored samples")]
    from gcsl.generation.generate import GenerateConfig, generate

    if not here.gen_prompts.is_file():
        write_jsonl(here.gen_prompts, [{"id": f"r{r}-{i}", "prompt": prompts[i % len(prompts)]["prompt"]}
                                       for i in range(cfg.samples_per_round)])
    if not here.samples.is_file():
        _say(f"round {r}: sample {cfg.samples_per_round} at goal {cfg.goal} -> {here.samples}")
        generate(resolve_config(GenerateConfig, overrides={
            **cfg.generate, "model": str(before.model), "prompts": str(here.gen_prompts), "out": here.samples,
            "goal": cfg.goal, "seed": cfg.seed + r, "num_samples": 1}))
    rows = [row for _, row in iter_jsonl(here.samples, "samples")]
    completions = [row["completion"] if isinstance(row.get("completion"), str) else "" for row in rows]
    scores = [float(s) for s in score(completions)]
    scored = [{"prompt": row["prompt"], "response": text, "score": s}
              for row, text, s in zip(rows, completions, scores)]
    write_jsonl(here.scored, scored)
    return scored


def _prepare(cfg: LoopConfig, r: int, here: _Round) -> None:
    from gcsl.data.prepare import PrepareConfig, prepare

    if (here.prepared / "goals.json").is_file():
        return
    _say(f"round {r}: prepare {cfg.method} -> {here.prepared}")
    prepare(resolve_config(PrepareConfig, overrides={
        **cfg.prepare, "data": str(here.pool), "data_format": "jsonl", "method": cfg.method, "out": here.prepared,
        "overwrite": True}))


def _train(cfg: LoopConfig, r: int, here: _Round, before: _Round | None) -> dict[str, Any]:
    from gcsl.training.train import TrainConfig, train

    folder = ModelFolder(here.model)
    if folder.state != "complete":
        resume = folder.last_checkpoint is not None
        _say(f"round {r}: train -> {here.model}" + (f" from {before.model}" if before else "")
             + (f" (resuming from {folder.last_checkpoint.name})" if resume else ""))
        train(resolve_config(TrainConfig, overrides={
            **cfg.train, "data": here.prepared, "model": cfg.model, "seed": cfg.seed, "out": here.model,
            "epochs": cfg.epochs_per_round, "max_steps": cfg.steps_per_round,
            "init_adapter": before.model if before is not None else None, "resume": resume,
            "overwrite": folder.state == "partial" and not resume}))
    metrics = here.model / "train_metrics.json"
    facts = json.loads(metrics.read_text(encoding="utf-8")) if metrics.is_file() else {}
    return {k: facts.get(k) for k in ("train_rows", "optimizer_steps", "epochs", "train_tokens", "train_seconds")}


def _write_final(cfg: LoopConfig, last: Path, records: list[dict[str, Any]]) -> Path:
    """The last round's model as the loop's output: a `gcsl train` folder plus rounds.json (run.json last)."""
    final = ModelFolder(cfg.final)
    rounds = {"method": cfg.method, "rounds": records}
    if final.state == "complete":
        record = json.loads((final.path / "run.json").read_text(encoding="utf-8"))
        if record.get("rounds") == records:
            return final.path
        shutil.rmtree(final.path)  # a loop continued with more rounds: the final model moves on
    work = final.partial
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(last, work, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    atomic_write_json(work / "rounds.json", rounds)
    run = json.loads((work / "run.json").read_text(encoding="utf-8"))
    run.update({"method": cfg.method, "online_loop": config_to_dict(cfg), "rounds": records,
                "optimizer_steps_all_rounds": sum(int(x.get("optimizer_steps") or 0) for x in records),
                "scorer_calls": sum(int(x.get("scorer_calls") or 0) for x in records)})
    (work / "run.json").unlink()
    atomic_write_json(work / "run.json", run)  # last: a folder that has it is complete
    final.path.parent.mkdir(parents=True, exist_ok=True)
    if final.path.exists():
        shutil.rmtree(final.path)
    os.replace(work, final.path)
    return final.path


def loop_problems(options: dict[str, Any]) -> list[str]:
    """Unknown LoopConfig keys in an experiment's `loop` block (caught before training)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(LoopConfig)}
    return [f"loop.{key}: unknown option of LoopConfig" for key in options if key not in known]
