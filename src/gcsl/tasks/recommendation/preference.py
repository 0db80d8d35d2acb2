"""RosePO and SPRec: preference-optimisation baselines for LLM recommenders, built from the feedback log.

Both start where these papers start, from SFT on the liked interactions (rating >= ``positive_min``), and
add DPO on pairs whose chosen response is the logged next item and whose rejected responses they build
themselves. Everything the pairs need (the log, the catalogue, the model's own recommendations) is read
by :func:`run_recipe`; which pairs are made is decided by pure functions (:func:`sample_rows`,
:func:`sprec_pairs`, :func:`rosepo_pairs`, :func:`personalized_smoothing`), tested on small fixtures.

**SPRec** (Gao et al., WWW 2025, arXiv:2412.09243; reference code github.com/RegionCh/SPRec,
``shell/SPRec.sh``, ``train/data_generate.py``, ``train/dpo.py``). Round 0 is SFT on every liked row (the
reference code starts from an SFT model). Each self-play round r >= 1 draws ``sample_size`` liked rows at
random, lets the current model recommend greedily for their prompts, then trains SFT on the drawn rows
(from the current adapter) and DPO (from that SFT adapter) with pairs (prompt, logged item, the model's
recommendation); a recommendation without a title is skipped, and one equal to the logged item is kept,
as the reference code does. One deviation: DPO's reference is the base model (``gcsl train`` disables the
LoRA adapter for it), where the reference code uses the round's SFT model.

**RosePO** (Liao et al., 2024, arXiv:2410.12519): SFT on the liked rows, then one DPO stage on pairs whose
rejected responses come from three samplers mapped onto this data: ``self-hard`` (helpfulness) the SFT
model's own recommendation when it names a catalogue item other than the logged one; ``hallucinated``
(harmlessness: semantic hallucination) that recommendation when it names no catalogue item; ``popular``
(harmlessness: popularity bias) the most rated training item the user has not seen. Each pair carries a
personalized smoothing factor, the preference oracle's probability that its label is wrong: the oracle is
an item-to-item co-occurrence recommender fitted on the training log (a conventional recommender, as the
paper's oracle is), and the factor ``max_smoothing * sigmoid(s(rejected) - s(chosen))``. The factor is
written to the pairs file and, after `gcsl prepare` has made the pairs, to the prepared data's
``smoothing`` column, which `gcsl train --preference-loss rosepo` reads
(:class:`gcsl.training.preference.RosePOTrainer`); SPRec's pairs train with plain DPO.

Files under ``out`` (each written atomically; a re-run skips finished stages)::

    positives.jsonl                              the liked rows (prompt, response, score)
    <stage>/log.jsonl, prompts.jsonl, samples.jsonl, pairs.jsonl   what the stage trained or sampled on
    <stage>/prepared/, <stage>/model/            `gcsl prepare` / `gcsl train` outputs
    <stage>/stage.json                           the stage's record, written last
    model/                                       the final model: the last stage's, plus stages.json

A training stage that trains what a finished run in one of the ``share`` folders trained (the same training
key, :func:`gcsl.training.train.training_key`: the rows as the trainer reads them, the options that change
training, the base model, the seed, the starting adapter's weights) takes that run's model (hard links) instead of
training again. RosePO and SPRec start from the same round-0 SFT on the liked rows, which is also BIGRec's
training, so an experiment running them trains it once per seed. The stage's record names where the model was
trained (``shared_from``) and keeps that training's compute, which is what the method costs when it runs alone.
An interrupted training stage resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gcsl.config import config_to_dict, field, resolve_config
from gcsl.errors import DataError
from gcsl.models import DEFAULT_MODEL
from gcsl.runinfo import atomic_write_json
from gcsl.stages import ModelFolder, iter_jsonl, write_jsonl
from gcsl.tasks.recommendation.baselines import history_titles
from gcsl.tasks.recommendation.grounding import extract_title
from gcsl.tasks.recommendation.prompts import format_response

__all__ = ["RecipeConfig", "run_recipe", "RECIPE_SET_BY_RUNNER", "STAGE_OWNED", "positive_rows", "sample_rows", "sprec_pairs", "rosepo_pairs",
           "cooccurrence_oracle", "personalized_smoothing", "NEGATIVE_SAMPLERS", "RECIPE_TRAIN_DEFAULTS"]

NEGATIVE_SAMPLERS = ("self-hard", "hallucinated", "popular")
# Training options the recipes default to beneath the experiment's own: RegionCh/SPRec shell/SPRec.sh trains SFT
# and DPO at lr 2e-5 for one epoch each (SFT batch 4 x 4 accumulation; DPO batch 2 x 4, beta 0.1 in train/dpo.py).
# RosePO states no other values in what we could read, so it shares them.
RECIPE_TRAIN_DEFAULTS = {"learning_rate": 2e-5, "epochs": 1.0, "beta": 0.1}
# RecipeConfig options `gcsl experiment` fills from its own blocks (a `recipe` block may not set them).
RECIPE_SET_BY_RUNNER = ("method", "data", "out", "model_out", "model", "seed", "catalogue_dataset", "catalogue_path",
                        "prompt_column", "response_column", "score_column", "data_format", "split", "prepare", "train",
                        "generate", "share")
# Stage-owned options: the workflow sets them per stage, an option block may not.
STAGE_OWNED = {"prepare": ("data", "out", "method", "overwrite", "sft_cutoff", "sft_top", "dpo_negatives", "dpo_pairs",
                           "prompt_column", "response_column", "score_column", "data_format", "split"),
               "train": ("data", "out", "model", "seed", "init_adapter", "resume", "overwrite", "preference_loss",
                         "max_steps"),
               "generate": ("model", "prompts", "out", "goal", "seed", "num_samples", "top_k", "limit",
                            "rank_catalogue")}


@dataclass
class RecipeConfig:
    method: Literal["rosepo", "sprec"] = field(help="which recipe: rosepo or sprec")
    data: str = field(help="recommendation feedback log (prompt, response = the quoted title, score = rating)")
    out: Path = field(help="recipe folder: every stage's data and model, the final model")
    model: str = field(DEFAULT_MODEL, help="base model: a built-in name, a local folder or a hub id")
    model_out: Path | None = field(None, help="where the final model goes (default: OUT/model)")
    positive_min: float = field(4.0, help="a row is liked (an SFT positive, a DPO chosen response) at this rating "
                                          "or above (4 of 5 stars: the usual implicit-feedback cut)")
    rounds: int = field(2, help="sprec: self-play rounds after round 0's SFT (shell/SPRec.sh takes the count as an "
                                "argument and sets none; 2 is ours)")
    sample_size: int | None = field(2048, help="liked rows drawn per self-play round (sprec; SPRec.sh: 2048) or "
                                               "sampled for RosePO's pairs; None = all of them")
    negatives: list[str] = field(default_factory=lambda: list(NEGATIVE_SAMPLERS),
                                 help=f"rosepo: rejected-response samplers, any of {', '.join(NEGATIVE_SAMPLERS)}")
    max_smoothing: float = field(0.5, help="rosepo: the largest smoothing factor, reached when the oracle is sure "
                                           "the label is wrong (0 = plain DPO)")
    catalogue_dataset: Literal["movielens", "amazon"] = field("movielens", help="catalogue of the recommendable "
                                                                                 "items (rosepo)")
    catalogue_path: Path | None = field(None, help="catalogue folder or file, as the evaluator's --path")
    prompt_column: str = field("prompt", help="prompt column of the feedback log")
    response_column: str = field("response", help="response column of the feedback log")
    score_column: str = field("score", help="score (rating) column of the feedback log")
    data_format: str = field("auto", help="feedback log format: auto, jsonl, csv, parquet or dataset")
    split: str = field("train", help="dataset split, for a datasets-hub log")
    seed: int = field(0, help="random seed (training; round r draws its rows with seed + r)")
    steps_per_stage: int = field(-1, help="optimizer steps of each SFT and DPO stage; > 0 overrides the epochs")
    stage_epochs: float | None = field(None, help="epochs of every stage after round 0's SFT (the self-play rounds' "
                                                  "SFT and DPO, RosePO's DPO; SPRec.sh: 1); None = the train "
                                                  "block's epochs, as round 0 trains")
    stage_learning_rate: float | None = field(None, help="peak learning rate of every stage after round 0's SFT "
                                                         "(None = the train block's, as round 0 trains)")
    share: list[Path] = field(default_factory=list, help="finished `gcsl train` folders, or other recipe folders "
                                                        "(their stage of the same name), whose model a stage takes "
                                                        "when it trained the same (same training key); gcsl "
                                                        "experiment passes its other recipes and trained methods "
                                                        "of the same seed")
    prepare: dict = field(default_factory=dict, cli=False, help="PrepareConfig options (kind, range ...)")
    train: dict = field(default_factory=dict, cli=False, help="TrainConfig options of every stage (LoRA, lr ...)")
    generate: dict = field(default_factory=dict, cli=False, help="GenerateConfig options of the model's own "
                                                                 "recommendations (max_new_tokens, batch_size)")

    def validate(self) -> list[str]:
        problems = []
        if self.rounds < 0:
            problems.append(f"rounds: must be >= 0, got {self.rounds}")
        if self.sample_size is not None and self.sample_size < 1:
            problems.append(f"sample_size: must be at least 1 (or null for every liked row), got {self.sample_size}")
        unknown = [n for n in self.negatives if n not in NEGATIVE_SAMPLERS]
        if unknown or not self.negatives:
            problems.append(f"negatives: use one or more of {', '.join(NEGATIVE_SAMPLERS)}, got {self.negatives}")
        if not 0 <= self.max_smoothing < 1:
            problems.append(f"max_smoothing: must be in [0, 1), got {self.max_smoothing}")
        if self.steps_per_stage == 0 or self.steps_per_stage < -1:
            problems.append(f"steps_per_stage: must be positive (or -1 to use epochs), got {self.steps_per_stage}")
        if self.stage_learning_rate is not None and not self.stage_learning_rate > 0:
            problems.append(f"stage_learning_rate: must be positive (or null for the train block's), got "
                            f"{self.stage_learning_rate}")
        if self.stage_epochs is not None and self.stage_epochs <= 0:
            problems.append(f"stage_epochs: must be positive (or null for the train block's epochs), got "
                            f"{self.stage_epochs}")
        return problems + _block_problems({"prepare": self.prepare, "train": self.train, "generate": self.generate})

    @property
    def final(self) -> Path:
        return Path(self.model_out) if self.model_out is not None else Path(self.out) / "model"


def _block_problems(blocks: dict[str, Any]) -> list[str]:
    """What is wrong with the stage option blocks: not a mapping, or setting what a stage sets itself."""
    wrong = [f"{stage}: expected a mapping of options, got {block!r}" for stage, block in blocks.items()
             if not isinstance(block, dict)]
    owned = {stage: sorted(set(block) & set(STAGE_OWNED[stage])) for stage, block in blocks.items()
             if isinstance(block, dict)}
    return wrong + [f"{stage}: the recipe sets {', '.join(keys)} itself; drop them" for stage, keys in owned.items()
                    if keys]


# -- which pairs: pure functions ----------------------------------------------------------------

def positive_rows(rows: Sequence[dict[str, Any]], positive_min: float) -> list[int]:
    """Indices of the liked rows, those rated ``positive_min`` or above, in log order.

    >>> positive_rows([{"score": 5}, {"score": 2}, {"score": 4}], 4)
    [0, 2]
    """
    return [i for i, row in enumerate(rows) if float(row["score"]) >= positive_min]


def sample_rows(indices: Sequence[int], size: int | None, seed: int) -> list[int]:
    """``size`` of ``indices`` drawn without replacement (all of them when ``size`` is None or larger), in the
    order drawn: SPRec's ``random.sample`` of the training data per round, seeded.

    >>> sample_rows([0, 1, 2, 3], None, 0), len(sample_rows(range(10), 3, 0))
    ([0, 1, 2, 3], 3)
    """
    indices = list(indices)
    if size is None or size >= len(indices):
        return indices
    return random.Random(seed).sample(indices, size)


def _pair(row: dict[str, Any], rejected_title: str, kind: str, smoothing: float = 0.0) -> dict[str, Any]:
    return {"prompt": row["prompt"], "chosen": row["response"], "rejected": format_response(rejected_title),
            "negative": kind, "smoothing": smoothing}


def sprec_pairs(rows: Sequence[dict[str, Any]], predictions: Sequence[str | None]) -> list[dict[str, Any]]:
    """SPRec's DPO pairs: each row's logged item against the model's own recommendation for its prompt.

    The rejected response is the recommendation's first title, quoted as responses are; a recommendation with
    no title is skipped; one naming the logged item itself is kept (the reference code does not filter it).

    >>> rows = [{"prompt": "p0", "response": '"Heat"'}, {"prompt": "p1", "response": '"Up"'}]
    >>> [(p["chosen"], p["rejected"]) for p in sprec_pairs(rows, ['I suggest "Alien".', "..."])]
    [('"Heat"', '"Alien"')]
    """
    out = []
    for row, text in zip(rows, predictions, strict=True):
        title = extract_title(text)
        if title is not None:
            out.append(_pair(row, title, "self-play"))
    return out


def cooccurrence_oracle(rows: Sequence[dict[str, Any]]) -> Counter:
    """RosePO's preference oracle here: how often each (history item, next item) pair occurs in the training log.

    >>> oracle = cooccurrence_oracle([{"prompt": '1. "Heat": 5 stars', "response": '"Up"'}])
    >>> oracle[("Heat", "Up")], oracle[("Up", "Heat")]
    (1, 0)
    """
    counts: Counter = Counter()
    for row in rows:
        target = extract_title(row["response"])
        for seen in history_titles(row["prompt"]):
            counts[(seen, target)] += 1
    return counts


def oracle_score(oracle: Counter, history: set[str], title: str) -> float:
    """The oracle's score of ``title`` for a user with this history: mean log(1 + co-occurrence count)."""
    if not history:
        return 0.0
    # In a fixed order: a set's order changes with the process's string hashing, and so would the float sum.
    return sum(math.log1p(oracle[(seen, title)]) for seen in sorted(history)) / len(history)


def personalized_smoothing(chosen_score: float, rejected_score: float, max_smoothing: float) -> float:
    """The pair's smoothing factor: ``max_smoothing`` times the oracle's Bradley-Terry probability that the
    rejected item is the preferred one, ``sigmoid(rejected_score - chosen_score)``.

    >>> personalized_smoothing(0.0, 0.0, 0.5), round(personalized_smoothing(1.0, 0.0, 0.5), 4)
    (0.25, 0.1345)
    """
    return max_smoothing / (1.0 + math.exp(chosen_score - rejected_score))


def rosepo_pairs(rows: Sequence[dict[str, Any]], predictions: Sequence[str | None], *, catalogue: Sequence[str],
                 popularity: Sequence[str], negatives: Sequence[str], oracle: Counter,
                 max_smoothing: float) -> list[dict[str, Any]]:
    """RosePO's DPO pairs: per liked row, one pair per sampler in ``negatives`` that yields an item.

    ``predictions``: the SFT model's recommendation for each row's prompt; ``catalogue``: every recommendable
    title; ``popularity``: titles, the most rated in the training log first. ``self-hard``: the recommendation
    when it is a catalogue title other than the logged one and not already in the history; ``hallucinated``:
    the recommendation when it is no catalogue title; ``popular``: the most popular title neither in the history
    nor the logged one. Each pair's ``smoothing`` is :func:`personalized_smoothing` of the oracle's scores.
    """
    known = set(catalogue)
    out = []
    for row, text in zip(rows, predictions, strict=True):
        target = extract_title(row["response"])
        history = history_titles(row["prompt"])
        own = extract_title(text)
        picked = {
            "self-hard": own if own in known and own != target and own not in history else None,
            "hallucinated": own if own is not None and own not in known else None,
            "popular": next((t for t in popularity if t != target and t not in history), None),
        }
        for kind in negatives:
            title = picked[kind]
            if title is not None:
                eps = personalized_smoothing(oracle_score(oracle, history, target),
                                             oracle_score(oracle, history, title), max_smoothing)
                out.append(_pair(row, title, kind, eps))
    return out


def pair_log(pairs: Sequence[dict[str, Any]], high: float, low: float) -> list[dict[str, Any]]:
    """The pairs as feedback rows for `gcsl prepare --method dpo`: per prompt each distinct chosen response, rated
    ``high``, and each distinct rejected response, rated ``low``. Prepare pairs them all within a prompt, which is
    exactly the pairs while a prompt has one chosen response; the recipe then writes its own pairs back over
    prepare's (:func:`_exact_pairs`)."""
    rows: dict[tuple, dict[str, Any]] = {}
    for p in pairs:
        key = json.dumps(p["prompt"], sort_keys=True)
        rows.setdefault((key, "chosen", p["chosen"]), {"prompt": p["prompt"], "response": p["chosen"], "score": high})
        rows.setdefault((key, "rejected", p["rejected"]),
                        {"prompt": p["prompt"], "response": p["rejected"], "score": low})
    return list(rows.values())


# -- the workflow -------------------------------------------------------------------------------

def run_recipe(cfg: RecipeConfig) -> Path:
    """Runs (or resumes) RosePO or SPRec; returns the final model folder.

    >>> run_recipe(RecipeConfig(method="sprec", data="train.jsonl", out=Path("runs/sprec")))  # doctest: +SKIP
    PosixPath('runs/sprec/model')
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = _log_rows(cfg)
    liked = [rows[i] for i in positive_rows(rows, cfg.positive_min)]
    if not liked:
        raise DataError(f"{cfg.data}: no row rated {cfg.positive_min:g} or above; lower positive_min or check the "
                        "score column")
    write_jsonl(out / "positives.jsonl", liked)
    records = [_sft_stage(cfg, out / "round-0-sft", liked, init=None)]
    model = out / "round-0-sft" / "model"
    if cfg.method == "sprec":
        for r in range(1, cfg.rounds + 1):
            drawn = [liked[i] for i in sample_rows(range(len(liked)), cfg.sample_size, cfg.seed + r)]
            predictions, sampled = _recommend(cfg, out / f"round-{r}-sample", drawn, model, r)
            records.append(sampled)
            records.append(_sft_stage(cfg, out / f"round-{r}-sft", drawn, init=model))
            records.append(_dpo_stage(cfg, out / f"round-{r}-dpo", sprec_pairs(drawn, predictions),
                                      init=out / f"round-{r}-sft" / "model"))
            model = _last_model(out, r)
    else:
        from gcsl.tasks.recommendation.baselines import popularity_ranking
        from gcsl.tasks.recommendation.data import load_catalogue

        catalogue = load_catalogue(cfg.catalogue_dataset, cfg.catalogue_path)
        drawn = [liked[i] for i in sample_rows(range(len(liked)), cfg.sample_size, cfg.seed)]
        predictions, sampled = _recommend(cfg, out / "round-1-sample", drawn, model, 1)
        records.append(sampled)
        popular = [t for t, _ in popularity_ranking((extract_title(r["response"]) or "" for r in rows), catalogue)]
        pairs = rosepo_pairs(drawn, predictions, catalogue=[it.title.strip() for it in catalogue],
                             popularity=popular, negatives=cfg.negatives, oracle=cooccurrence_oracle(rows),
                             max_smoothing=cfg.max_smoothing)
        records.append(_dpo_stage(cfg, out / "round-1-dpo", pairs, init=model))
        model = _last_model(out, 1)
    return _write_final(cfg, model, records)


def _last_model(out: Path, r: int) -> Path:
    """Round r's model: its DPO stage's, or its SFT stage's (SPRec; RosePO's round 0) when DPO was skipped."""
    dpo = out / f"round-{r}-dpo" / "model"
    if ModelFolder(dpo).state == "complete":
        return dpo
    return next(p for p in (out / f"round-{r}-sft" / "model", out / "round-0-sft" / "model") if p.is_dir())


def _log_rows(cfg: RecipeConfig) -> list[dict[str, Any]]:
    from gcsl.data.load import read_feedback

    table, _ = read_feedback(cfg.data, prompt_column=cfg.prompt_column, response_column=cfg.response_column,
                             score_column=cfg.score_column, fmt=cfg.data_format, split=cfg.split)
    return [{"prompt": r["prompt"], "response": r["response"], "score": r["score_raw"]} for r in table.to_pylist()]


def _say(msg: str) -> None:
    import sys

    print(f"[gcsl recipe {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _stage_record(folder: Path, build, check=None) -> dict[str, Any]:
    """The stage's record: read back when the stage finished before (after ``check()``, which raises if the stage
    was made with other settings), else made by ``build`` and written last."""
    record_file = folder / "stage.json"
    if record_file.is_file():
        if check is not None:
            check()
        return json.loads(record_file.read_text(encoding="utf-8"))
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    record = {"stage": folder.name, **build(), "wall_seconds": None}
    record["wall_seconds"] = round(time.perf_counter() - started, 3)
    atomic_write_json(record_file, record)
    return record


def _train_stage(cfg: RecipeConfig, folder: Path, log: list[dict[str, Any]], method: str, options: dict[str, Any],
                 init: Path | None, stage_rows: int, *, pairs: Sequence[dict[str, Any]] = (),
                 preference_loss: str = "dpo") -> dict[str, Any]:
    """Prepares ``log`` with ``method`` (the same `gcsl prepare` every method uses) and trains on it, or takes the
    model of a run in ``cfg.share`` that trained the same; with ``preference_loss`` rosepo, each prepared pair
    first gets its smoothing factor from ``pairs``."""
    from gcsl.data.prepare import PrepareConfig, prepare
    from gcsl.training.train import TrainConfig, train, training_key

    prepared, model = folder / "prepared", folder / "model"
    train_options = _stage_train_options(cfg, folder, method, init, preference_loss)
    write_jsonl(folder / "log.jsonl", log)
    if not (prepared / "goals.json").is_file():
        prepare(resolve_config(PrepareConfig, overrides={
            **cfg.prepare, **options, "method": method, "data": str(folder / "log.jsonl"), "data_format": "jsonl",
            "out": prepared, "overwrite": True, "quiet": True}))
    if pairs:  # every time: a run cut short after prepare has not rewritten them yet
        _exact_pairs(prepared / "train.parquet", log, pairs, smoothing=preference_loss == "rosepo")
    key = training_key(resolve_config(TrainConfig, overrides=train_options))
    shared = _shared_model(cfg, model, key)
    state = ModelFolder(model)
    if state.state != "complete":
        # An interrupted stage goes on from its last whole checkpoint; one that died before it starts over.
        resume = state.last_checkpoint is not None
        _say(f"{folder.name}: train {method} on {stage_rows} rows" + (f" from {init}" if init else "")
             + (f" (resuming from {state.last_checkpoint.name})" if resume else ""))
        train(resolve_config(TrainConfig, overrides={
            **train_options, "resume": resume, "overwrite": state.state == "partial" and not resume}))
    facts = json.loads((model / "train_metrics.json").read_text(encoding="utf-8"))
    return {"rows": stage_rows, **{k: facts.get(k) for k in ("train_rows", "optimizer_steps", "epochs",
                                                             "train_tokens", "train_seconds")}, "key": key,
            **({"shared_from": shared} if shared else {})}


def _stage_train_options(cfg: RecipeConfig, folder: Path, method: str, init: Path | None,
                         preference_loss: str) -> dict[str, Any]:
    """The TrainConfig options of the stage in ``folder``."""
    # Round 0's SFT, the one stage that starts from the base model, is the recipes' SFT baseline and trains as
    # the train block says; every stage built on it may take its own, shorter budget.
    later = {} if init is None else {k: v for k, v in (("epochs", cfg.stage_epochs),
                                                      ("learning_rate", cfg.stage_learning_rate)) if v is not None}
    return {**RECIPE_TRAIN_DEFAULTS, **cfg.train, **later, "max_steps": cfg.steps_per_stage,
            **({"preference_loss": preference_loss} if method == "dpo" else {}), "model": cfg.model,
            "seed": cfg.seed, "init_adapter": None if init is None else str(init),
            "data": folder / "prepared", "out": folder / "model"}


def _check_stage(cfg: RecipeConfig, folder: Path, method: str, init: Path | None,
                 preference_loss: str = "dpo") -> None:
    """Raises ConfigError when the finished stage in ``folder`` trained otherwise than ``cfg`` now says (a changed
    stage_learning_rate, say); a stage that trained nothing (DPO without pairs) has nothing to compare."""
    from gcsl.training.train import TrainConfig, check_same_training

    if ModelFolder(folder / "model").state == "complete":
        check_same_training(folder / "model", resolve_config(TrainConfig, overrides=_stage_train_options(
            cfg, folder, method, init, preference_loss)))


def _shared_model(cfg: RecipeConfig, model: Path, key: str) -> str | None:
    """Where the model of a finished run in ``cfg.share`` with training key ``key`` was trained, after hard-linking
    it into ``model`` (under a temporary name, then renamed); None when ``model`` is finished already or no
    such run exists. A run's seconds stay in its train_metrics.json: the method's compute is the training's."""
    from gcsl.training.train import recorded_training_key

    if ModelFolder(model).state == "complete":
        return None
    for shared in cfg.share:
        other = Path(shared) if (Path(shared) / "run.json").is_file() else Path(shared) / model.parent.name / "model"
        if other.resolve() == model.resolve() or recorded_training_key(other) != key:
            continue
        origin = json.loads((other / "run.json").read_text(encoding="utf-8"))["config"]["out"]
        _say(f"{model.parent.name}: the same training as {origin}; taking its model")
        work = model.with_name(model.name + ".shared")
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(other, work, copy_function=os.link)
        shutil.rmtree(ModelFolder(model).partial, ignore_errors=True)  # an interrupted run of its own
        os.replace(work, model)
        return str(origin)
    return None


def _sft_stage(cfg: RecipeConfig, folder: Path, liked: list[dict[str, Any]], init: Path | None) -> dict[str, Any]:
    # Every row given is liked, so the cut keeps them all.
    return _stage_record(folder, lambda: {"kind": "sft", **_train_stage(
        cfg, folder, liked, "sft", {"sft_cutoff": cfg.positive_min}, init, len(liked))},
        check=lambda: _check_stage(cfg, folder, "sft", init))


def _dpo_stage(cfg: RecipeConfig, folder: Path, pairs: list[dict[str, Any]], init: Path) -> dict[str, Any]:
    """DPO from ``init`` on ``pairs``; with no pairs at all (no recommendation named an item) the stage trains
    nothing, says so and records ``pairs: 0``, and the recipe goes on from ``init``."""
    loss = "rosepo" if cfg.method == "rosepo" else "dpo"

    def build() -> dict[str, Any]:
        if not pairs:
            _say(f"{folder.name}: no preference pairs (no recommendation named an item); DPO skipped, the model "
                 "stays the SFT model")
            return {"kind": "dpo", "rows": 0, "pairs": 0, "optimizer_steps": 0, "skipped": "no pairs"}
        write_jsonl(folder / "pairs.jsonl", pairs)
        scores = sorted({float(p) for p in (cfg.prepare.get("score_range") or [0.0, 1.0])})
        per_prompt = max(Counter(json.dumps(p["prompt"], sort_keys=True) for p in pairs).values())
        facts = _train_stage(cfg, folder, pair_log(pairs, high=scores[-1], low=scores[0]), "dpo",
                             {"dpo_negatives": "observed", "dpo_pairs": per_prompt}, init, len(pairs), pairs=pairs,
                             preference_loss=loss)
        kinds = Counter(p["negative"] for p in pairs)
        smoothing = [p["smoothing"] for p in pairs]
        return {"kind": "dpo", **facts, "pairs": len(pairs), "negatives": dict(kinds),
                "mean_smoothing": sum(smoothing) / len(smoothing), "smoothing_applied": loss == "rosepo"}

    return _stage_record(folder, build, check=lambda: _check_stage(cfg, folder, "dpo", init, loss))


def _exact_pairs(parquet: Path, log: Sequence[dict[str, Any]], pairs: Sequence[dict[str, Any]], *,
                 smoothing: bool) -> int:
    """Rewrites the prepared pairs in ``parquet`` (in place, through a temporary file) as exactly the recipe's
    ``pairs``, each once; returns how many (a second rewrite gives the same file). `gcsl prepare` pairs every
    chosen response of a prompt with every rejected one, which makes pairs the recipe never made where one prompt
    is the history of two liked rows (two logged next items). Each row keeps prepare's rendering of its prompt
    and answers; its row ids point into ``log`` (:func:`pair_log`); with ``smoothing``, its factor goes to the
    ``smoothing`` column RosePO's loss reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gcsl.methods import SMOOTHING_COLUMN

    def prompt_key(prompt: Any) -> str:
        return json.dumps(prompt, sort_keys=True)

    table = pq.read_table(parquet)
    if SMOOTHING_COLUMN in table.column_names:  # rewritten before: the same rows come out again
        table = table.drop_columns([SMOOTHING_COLUMN])
    prepared = table.to_pylist()
    rendered = {}
    for row in prepared:
        rendered.setdefault(prompt_key(row["prompt"]), row)
    # With chat prompts prepare writes each answer as one assistant message.
    chat = bool(prepared) and not isinstance(prepared[0]["chosen"], str)
    high, low = max(r["score"] for r in log), min(r["score"] for r in log)
    row_id = {(prompt_key(r["prompt"]), r["response"], r["score"]): i for i, r in enumerate(log)}
    out, seen = [], set()
    for i, pair in enumerate(pairs):
        key = prompt_key(pair["prompt"])
        if (key, pair["chosen"], pair["rejected"]) in seen:
            continue  # two samplers named the same negative: one pair, as prepare makes it
        seen.add((key, pair["chosen"], pair["rejected"]))
        base = rendered.get(key)
        if base is None:
            raise DataError(f"{parquet}: gcsl prepare made no pair for the prompt of pair {i} of the recipe; delete "
                            f"{parquet.parent} and re-run")
        row = {**base, **{side: [{"role": "assistant", "content": pair[side]}] if chat else pair[side]
                          for side in ("chosen", "rejected")},
               "row_id_chosen": row_id[(key, pair["chosen"], high)],
               "row_id_rejected": row_id[(key, pair["rejected"], low)]}
        if smoothing:
            row[SMOOTHING_COLUMN] = float(pair["smoothing"])
        out.append(row)
    schema = table.schema.append(pa.field(SMOOTHING_COLUMN, pa.float64())) if smoothing else table.schema
    tmp = parquet.with_name(parquet.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(out, schema=schema), tmp)
    os.replace(tmp, parquet)
    return len(out)


def _recommend(cfg: RecipeConfig, folder: Path, drawn: list[dict[str, Any]], model: Path,
               r: int) -> tuple[list[str | None], dict[str, Any]]:
    """The model's own greedy recommendation (top_k = 1, as the reference code decodes) for each drawn prompt."""
    from gcsl.generation.generate import GenerateConfig, generate

    prompts, samples = folder / "prompts.jsonl", folder / "samples.jsonl"

    def build() -> dict[str, Any]:
        write_jsonl(prompts, [{"id": f"r{r}-{i}", "prompt": row["prompt"]} for i, row in enumerate(drawn)])
        started = time.perf_counter()
        _say(f"{folder.name}: {len(drawn)} recommendations by {model}")
        generate(resolve_config(GenerateConfig, overrides={
            **cfg.generate, "model": str(model), "prompts": str(prompts), "out": samples, "goal": "top",
            "seed": cfg.seed + r, "num_samples": 1, "top_k": 1}))
        return {"kind": "sample", "samples_generated": len(drawn),
                "generate_seconds": round(time.perf_counter() - started, 3)}

    record = _stage_record(folder, build)
    by_id = {row["prompt_id"]: row.get("completion") for _, row in iter_jsonl(samples, "samples")}
    return [by_id.get(f"r{r}-{i}") for i in range(len(drawn))], record


def _write_final(cfg: RecipeConfig, last: Path, records: list[dict[str, Any]]) -> Path:
    """The last stage's model as the recipe's output: a `gcsl train` folder plus stages.json and the recipe's
    compute in run.json (run.json written last)."""
    final = ModelFolder(cfg.final)
    if final.state == "complete":
        return final.path
    work = final.partial
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(last, work, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    atomic_write_json(work / "stages.json", {"method": cfg.method, "stages": records})

    def total(key: str) -> float:
        return round(sum(float(r.get(key) or 0) for r in records), 3)

    run = json.loads((work / "run.json").read_text(encoding="utf-8"))
    run.update({"method": cfg.method, "recipe": config_to_dict(cfg), "stages": records,
                "compute": {"train_rows": total("train_rows"), "optimizer_steps": int(total("optimizer_steps")),
                            "train_seconds": total("train_seconds"),
                            "samples_generated": int(total("samples_generated")),
                            "generate_seconds": total("generate_seconds"), "wall_seconds": total("wall_seconds")}})
    (work / "run.json").unlink()
    atomic_write_json(work / "run.json", run)
    final.path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(work, final.path)
    return final.path
