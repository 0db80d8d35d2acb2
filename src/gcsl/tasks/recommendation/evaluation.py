"""Scoring recommendation generations: grounded rank of the target, then NDCG@k, ERR@k and HR@k.

NDCG's ideal list is an option (``ndcg_ideal``): ``g_max`` (the default, the paper's graded form:
an item of the scale's top grade at rank 1, so a low-rated target earns less) or ``target`` (the
target itself at rank 1, so the grade cancels and NDCG = 1/log2(rank + 1), the form BIGRec, D3
and SPRec report). See :func:`gcsl.metrics.ranking.target_ndcg`.

Grounding is an option too (``grounding``): ``cosine`` (a sentence-transformer, the default for every
method) or ``bigrec-l2`` (BIGRec's: the base LLM ``lm`` embeds titles, L2 distance ranks them, weighed by
training popularity when ``popularity_gamma`` > 0; :mod:`~gcsl.tasks.recommendation.bigrec`). The
``bigrec`` method of :data:`gcsl.methods.METHODS` is scored with it in ``gcsl experiment``.

Rows that carry a ``ranking`` (the catalogue's titles, best first: ``gcsl generate --rank-catalogue``, or the
random and most-popular baselines under it) are not grounded: the target's rank is its place in that list.
A file mixes neither kind; a ranking that lacks the target is a DataError (it was made on another catalogue).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gcsl.config import field
from gcsl.errors import ConfigError, DataError
from gcsl.metrics.ranking import DEFAULT_G_MAX, target_err, target_hit, target_ndcg
from gcsl.tasks.base import TaskResult
from gcsl.tasks.recommendation.data import CATALOGUE_FILE, as_number, load_catalogue, read_catalogue_file
from gcsl.tasks.recommendation.grounding import (
    GROUNDINGS,
    MINILM,
    TIE_POLICY,
    GroundedTitle,
    TitleGrounder,
    extract_title,
    load_encoder,
)

__all__ = ["RecommendationEvalConfig", "evaluate", "build_grounder"]

_LM_NEEDED = "lm: bigrec-l2 grounding embeds titles with a causal LM; give --lm (the base model)"


@dataclass
class RecommendationEvalConfig:
    dataset: Literal["movielens", "amazon"] = field("movielens", help="whose item titles form the catalogue "
                                                    "that generations are ranked against")
    path: Path | None = field(None, help="the folder `gcsl data recommendation` wrote (its catalogue.jsonl: the "
                              "items the prompts were built on, restricted by top_items if they were); or movielens: "
                              "folder with ml-100k.item (default: the recbole package's copy); amazon: the D3-style "
                              "CSV file or folder the prompts came from")
    grounding: Literal["cosine", "bigrec-l2"] = field(
        "cosine", help="how a generated title is matched to catalogue items: cosine = sentence-transformer "
                       "(--model) cosine similarity; bigrec-l2 = BIGRec's L2 distance between the base LLM's "
                       "(--lm) last-layer last-token states")
    model: str = field(MINILM, help="sentence-transformer used for cosine grounding: 'minilm' (the offline "
                       "all-MiniLM-L6-v2 package) or any sentence-transformers model name or path")
    lm: str | None = field(None, help="bigrec-l2: the causal LM whose hidden states embed titles (BIGRec uses the "
                           "base model the method was tuned from); `gcsl experiment` sets it to its model")
    popularity_gamma: float = field(0.0, help="bigrec-l2: weight of training popularity, distance / (1 + pop) ** "
                                    "gamma with both min-max scaled (BIGRec tunes it on validation over 0..99; 0 = "
                                    "plain L2); needs --path to a `gcsl data recommendation` folder; cosine "
                                    "grounding ignores it")
    device: str = field("cpu", help="device of the sentence-transformer or LM")
    batch_size: int = field(64, help="texts embedded per batch")
    ks: list[int] = field(default_factory=lambda: [10, 20], help="cut-offs k of NDCG@k, ERR@k and HR@k")
    g_max: float = field(DEFAULT_G_MAX, help="ERR's maximum grade: R(g) = (2^g - 1) / 2^g_max (5 for 1-5 stars)")
    ndcg_ideal: Literal["g_max", "target"] = field(
        "g_max", help="NDCG's ideal list: g_max = an item of grade g_max at rank 1, so higher ratings count more "
                      "(the paper's graded NDCG); target = the target itself at rank 1, so the grade cancels and "
                      "NDCG = 1/log2(rank+1) (BIGRec / D3 / SPRec)")

    def validate(self) -> list[str]:
        problems = []
        if self.dataset == "amazon" and self.path is None:
            problems.append("path: the amazon catalogue needs --path (the D3-style CSV file or folder)")
        if not self.ks or any(k < 1 for k in self.ks):
            problems.append(f"ks: give one or more positive cut-offs, got {self.ks}")
        if self.batch_size < 1:
            problems.append("batch_size: must be >= 1")
        if not self.g_max > 0:
            problems.append("g_max: must be > 0")
        if self.grounding not in GROUNDINGS:
            problems.append(f"grounding: {self.grounding!r} is not one of {', '.join(GROUNDINGS)}")
        if self.grounding == "bigrec-l2" and not self.lm:
            problems.append(_LM_NEEDED)
        if self.popularity_gamma < 0:
            problems.append(f"popularity_gamma: must be >= 0, got {self.popularity_gamma}")
        return problems


def _rating(value: Any, where: str, g_max: float) -> float:
    if isinstance(value, bool):
        raise DataError(f"{where}: meta.target_rating must be a number, got {value!r}")
    x = as_number(value, where, "meta.target_rating")
    if not 0 <= x <= g_max:
        raise DataError(f"{where}: meta.target_rating {x:g} is outside [0, {g_max:g}]; raise --g-max to the "
                        "rating scale's maximum")
    return x


def _check_rows(rows: Sequence[dict[str, Any]], g_max: float) -> list[tuple[str, str, float]]:
    """(prompt_id, target title, rating) per row; one DataError lists the first problems found."""
    problems: list[str] = []
    parsed: list[tuple[str, str, float]] = []
    targets: dict[str, tuple[str, float]] = {}
    for i, row in enumerate(rows, start=1):
        where = f"generation row {i}"
        try:
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object")
            pid = row.get("prompt_id")
            if pid is None:
                raise DataError(f"{where}: missing prompt_id; use files written by `gcsl generate`")
            if not isinstance(row.get("completion"), str):
                raise DataError(f"{where}: completion must be a string")
            meta = row.get("meta")
            if not isinstance(meta, dict) or not isinstance(meta.get("target_title"), str) or \
                    not meta["target_title"].strip():
                raise DataError(f"{where}: meta.target_title is missing; generate from prompts written by "
                                "`gcsl data recommendation`")
            if "target_rating" not in meta:
                raise DataError(f"{where}: meta.target_rating is missing; generate from prompts written by "
                                "`gcsl data recommendation`")
            title, rating = meta["target_title"].strip(), _rating(meta["target_rating"], where, g_max)
            if targets.setdefault(str(pid), (title, rating)) != (title, rating):
                raise DataError(f"{where}: prompt_id {pid} has target {title!r} ({rating:g}) here but "
                                f"{targets[str(pid)][0]!r} ({targets[str(pid)][1]:g}) on an earlier row")
            parsed.append((str(pid), title, rating))
        except DataError as exc:
            problems.append(str(exc))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DataError("; ".join(problems[:3]) + more)
    return parsed


def _ranked_rows(rows: Sequence[dict[str, Any]], targets: Sequence[tuple[str, str, float]]) -> list[GroundedTitle] | None:
    """Each row's target place in its own ``ranking`` (None when no row has one)."""
    has = [isinstance(row.get("ranking"), list) for row in rows]
    if not any(has):
        return None
    if not all(has):
        first = has.index(False) + 1
        raise DataError(f"generation row {first}: has no ranking while other rows have one; score one kind of "
                        "file (all ranked by `gcsl generate --rank-catalogue`, or all sampled)")
    out = []
    for i, (row, (_, title, _)) in enumerate(zip(rows, targets), start=1):
        ranking = [str(t).strip() for t in row["ranking"]]
        if title not in ranking:
            raise DataError(f"generation row {i}: its ranking ({len(ranking)} titles) lacks the target {title!r}; "
                            "rank with the catalogue of the data the prompts came from")
        place = ranking.index(title)
        out.append(GroundedTitle(rank=float(place + 1), nearest_title=ranking[0], similarity=float("nan")))
    return out


def build_grounder(config: RecommendationEvalConfig) -> TitleGrounder:
    """The grounder ``config`` asks for, over the catalogue of ``config.dataset`` / ``config.path``.

    >>> g = build_grounder(RecommendationEvalConfig(grounding="bigrec-l2", lm="smollm2-135m-instruct"))  # doctest: +SKIP
    """
    catalogue_file = config.path is not None and (Path(config.path) / CATALOGUE_FILE).is_file()
    if config.grounding == "cosine":
        titles = [it.title for it in load_catalogue(config.dataset, config.path)]
        return TitleGrounder(titles, load_encoder(config.model, config.device), batch_size=config.batch_size)
    from gcsl.tasks.recommendation.bigrec import LastTokenEncoder

    if not config.lm:
        raise ConfigError(_LM_NEEDED)
    if config.popularity_gamma and not catalogue_file:
        raise ConfigError(f"path: popularity_gamma needs the items' training counts; set --path to the folder "
                          f"`gcsl data recommendation` wrote (it holds {CATALOGUE_FILE})")
    if catalogue_file:
        items, popularity = read_catalogue_file(Path(config.path))
    else:
        items, popularity = load_catalogue(config.dataset, config.path), None
    return TitleGrounder([it.title for it in items], LastTokenEncoder(config.lm, config.device),
                         batch_size=config.batch_size, metric="l2", popularity=popularity,
                         popularity_gamma=config.popularity_gamma)


def evaluate(rows: list[dict[str, Any]], config: RecommendationEvalConfig, *,
             grounder: TitleGrounder | None = None) -> TaskResult:
    """Grounds every generation in the catalogue and scores NDCG@k, ERR@k and HR@k per prompt.

    ``grounder`` reuses already embedded catalogue titles (and fixes the encoder); by default one
    is built from ``config`` (:func:`build_grounder`).

    >>> result = evaluate(rows, RecommendationEvalConfig())  # doctest: +SKIP
    >>> result.metrics["ndcg@10"]  # doctest: +SKIP
    0.0123
    """
    if not rows:
        raise DataError("no generations to evaluate; check the --generations file")
    targets = _check_rows(rows, config.g_max)
    ranked = _ranked_rows(rows, targets)
    if ranked is None:  # sampled titles: ground them in the catalogue
        grounder = grounder if grounder is not None else build_grounder(config)
        unknown = sorted({title for _, title, _ in targets if title not in grounder})
        if unknown:
            raise DataError(f"meta.target_title not in the {config.dataset} catalogue: "
                            f"{', '.join(map(repr, unknown[:3]))}{' ...' if len(unknown) > 3 else ''}; set "
                            "--dataset/--path to the data the prompts came from")

    extracted = [extract_title(row["completion"]) for row in rows]
    if ranked is not None:
        grounded = dict(enumerate(ranked))
        usable = list(range(len(rows)))
    else:
        usable = [i for i, t in enumerate(extracted) if t is not None]
        grounded = dict(zip(usable, grounder.ground([extracted[i] for i in usable],
                                                    [targets[i][1] for i in usable])))

    ranks = np.array([grounded[i].rank if i in grounded else np.inf for i in range(len(rows))])
    grades = np.array([t[2] for t in targets])
    metric_values: dict[str, np.ndarray] = {}
    for k in config.ks:
        metric_values[f"ndcg@{k}"] = target_ndcg(ranks, grades, k,
                                                 ideal_grade=config.g_max if config.ndcg_ideal == "g_max" else None)
        metric_values[f"err@{k}"] = target_err(ranks, grades, k, config.g_max)
        metric_values[f"hr@{k}"] = target_hit(ranks, k)
    metric_values["unparsable"] = np.array([0.0 if i in grounded else 1.0 for i in range(len(rows))])

    items = []
    for i, row in enumerate(rows):
        g = grounded.get(i)
        item = {"prompt_id": targets[i][0], "sample": row.get("sample"), "target_title": targets[i][1],
                "target_rating": targets[i][2], "extracted_title": extracted[i],
                "nearest_title": g.nearest_title if g else None,
                "similarity": g.similarity if g and np.isfinite(g.similarity) else None,
                "rank": int(g.rank) if g and np.isfinite(g.rank) else None,
                "status": "ranked" if g else "unparsable",
                "reason": None if g else "no title: the generation is empty or has no letters or digits"}
        item.update({name: float(v[i]) for name, v in metric_values.items()})
        items.append(item)

    by_unit: dict[str, list[int]] = defaultdict(list)
    for i, (pid, _, _) in enumerate(targets):
        by_unit[pid].append(i)
    unit_scores = {name: {pid: float(v[idx].mean()) for pid, idx in by_unit.items()}
                   for name, v in metric_values.items()}
    metrics = {name: float(np.mean(list(scores.values()))) for name, scores in unit_scores.items()}
    n_unparsable = len(rows) - len(usable)

    options = {"dataset": config.dataset, "path": str(config.path) if config.path else None,
               "ks": list(config.ks), "g_max": config.g_max, "ndcg_ideal": config.ndcg_ideal}
    if ranked is not None:  # the rows ranked the catalogue themselves: no encoder, no ties to break
        options.update(grounding="ranking", catalogue_unique_titles=len(rows[0]["ranking"]))
        policy = "none: each row's ranking orders every title"
    else:
        options.update(grounding=config.grounding, popularity_gamma=config.popularity_gamma,
                       model=config.model if config.grounding == "cosine" else config.lm,
                       catalogue_items=grounder.n_items, catalogue_unique_titles=len(grounder.unique_titles))
        policy = TIE_POLICY
    options["tie_policy"] = policy
    notes = [f"tie policy: {policy}",
             "each metric (unparsable: the share of generations naming no title) is averaged over a prompt's "
             "generations, then over prompts"]
    if n_unparsable:
        notes.append(f"{n_unparsable} of {len(rows)} generation(s) named no title and scored 0")
    return TaskResult(task="recommendation", metrics=metrics, unit_scores=unit_scores, items=items,
                      n_units=len(by_unit), n_generations=len(rows), options=options, notes=notes)
