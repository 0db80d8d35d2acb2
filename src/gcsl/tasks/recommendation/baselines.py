"""Sanity baselines with no language model: a random catalogue item, or the most popular unseen one.

Every recommendation report should carry both, so a reader sees whether a method learned anything:

- ``random``: each generation names a catalogue item drawn uniformly (an item, so a title held by
  several items is that much likelier), from a generator seeded by ``seed``, the prompt id and the
  sample number, so a row does not depend on which other prompts or samples are written;
- ``most-popular``: the title rated most often in the *training* feedback log (each row's response
  is one training interaction), the most popular first, skipping the titles the prompt's history
  already shows; ties go to the title that comes first in the catalogue. The evaluator scores one
  title per generation, so every sample of a prompt names the same title (a deterministic
  recommender, like greedy decoding); more samples change nothing.

Both write the rows ``gcsl generate`` writes (``prompt_id, prompt, goal, goal_request, sample,
completion, meta``; goal-free, so ``goal`` and ``goal_request`` are null) with the completion as
the prompts ask for it (:func:`~gcsl.tasks.recommendation.prompts.format_response`), so the
unchanged evaluator grounds each title exactly. The catalogue is the one the evaluator grounds
against (``dataset``, ``path``). ``gcsl experiment`` runs them as the methods ``random`` and
``most-popular`` (:data:`gcsl.methods.METHODS`).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gcsl.config import field
from gcsl.errors import DataError
from gcsl.runinfo import write_run_record
from gcsl.stages import write_jsonl
from gcsl.tasks.recommendation.data import CatalogueItem, load_catalogue
from gcsl.tasks.recommendation.grounding import extract_title
from gcsl.tasks.recommendation.prompts import format_response

__all__ = ["BASELINES", "BaselineConfig", "write_baseline_generations", "popularity_ranking", "history_titles"]

BASELINES = ("random", "most-popular")

# One history line of build_prompt: `3. "Title": 4 stars` (curly quotes when the title holds a straight one).
_HISTORY_LINE = re.compile(r"^\d+\. (.+): [0-9.eE+-]+ stars?$")


@dataclass
class BaselineConfig:
    kind: Literal["random", "most-popular"] = field(help="random: a uniformly random catalogue item per "
                                                         "generation; most-popular: the training log's most "
                                                         "rated title the prompt's history does not hold")
    prompts: str = field(help="prompts JSONL (or any source `gcsl generate` reads), from `gcsl data recommendation`")
    out: Path = field(help="output generations JSONL (the rows `gcsl generate` writes)")
    dataset: Literal["movielens", "amazon"] = field("movielens", help="whose catalogue the evaluator grounds "
                                                    "against (as `gcsl evaluate recommendation --dataset`)")
    path: Path | None = field(None, help="movielens: folder with ml-100k.item (default: the recbole package's "
                              "copy); amazon: the D3-style CSV file or folder (as the evaluator's --path)")
    feedback: str | None = field(None, help="most-popular: the training feedback log whose responses are counted "
                                            "(`gcsl data recommendation`'s train.jsonl)")
    prompt_column: str = field("prompt", help="the feedback log's prompt column")
    response_column: str = field("response", help="the feedback log's response column (the rated title)")
    score_column: str = field("score", help="the feedback log's score column")
    data_format: str = field("auto", help="the feedback log's format (auto, jsonl, csv, parquet, ...)")
    num_samples: int = field(1, help="generations per prompt")
    seed: int = field(0, help="random: seed of the draws")
    limit: int | None = field(None, help="use only the first N prompts")
    id_field: str = field("id", help="field holding the prompt id (as `gcsl generate --id-field`)")
    prompt_field: str = field("prompt", help="field holding the prompt (as `gcsl generate --prompt-field`)")
    split: str = field("train", help="split to read when --prompts is a dataset with splits")
    rank: bool = field(False, help="write each prompt's whole ranking of the catalogue's titles (row field "
                                   "`ranking`, as `gcsl generate --rank-catalogue` does) instead of one title: "
                                   "random = a seeded shuffle; most-popular = popularity order, the history's "
                                   "titles last")

    def validate(self) -> list[str]:
        problems = []
        if self.kind not in BASELINES:
            problems.append(f"kind: {self.kind!r} is not one of {', '.join(BASELINES)}")
        if self.kind == "most-popular" and self.feedback is None:
            problems.append("feedback: most-popular counts the training feedback log; give --feedback")
        if self.dataset == "amazon" and self.path is None:
            problems.append("path: the amazon catalogue needs --path (the D3-style CSV file or folder)")
        if self.num_samples < 1:
            problems.append(f"num_samples: must be at least 1, got {self.num_samples}")
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit: must be at least 1, got {self.limit}")
        if self.rank and self.num_samples != 1:
            problems.append(f"num_samples: a ranking is one row per prompt; with rank give 1, got {self.num_samples}")
        return problems


def history_titles(prompt: str | Sequence[dict[str, str]]) -> set[str]:
    """The titles a recommendation prompt's history shows (its numbered lines), as the catalogue spells them.

    >>> sorted(history_titles('rated these:\\n1. "Heat": 5 stars\\n2. “The "Black" Album”: 1 star\\nRecommend one.'))
    ['Heat', 'The "Black" Album']
    """
    text = prompt if isinstance(prompt, str) else "\n".join(m.get("content", "") for m in prompt)
    out = set()
    for line in text.splitlines():
        match = _HISTORY_LINE.match(line.strip())
        title = extract_title(match.group(1)) if match else None
        if title is not None:
            out.add(title.strip())
    return out


def popularity_ranking(train_titles: Iterable[str], catalogue: Sequence[CatalogueItem]) -> list[tuple[str, int]]:
    """Every distinct catalogue title with its count among ``train_titles``, the most counted first.

    Ties (and the never-rated titles, count 0, at the end) keep catalogue order. A training title
    missing from the catalogue is a DataError: the log and the catalogue come from different data.

    >>> items = [CatalogueItem("1", "Heat"), CatalogueItem("2", "Alien"), CatalogueItem("3", "Up")]
    >>> popularity_ranking(["Up", "Alien", "Up"], items)
    [('Up', 2), ('Alien', 1), ('Heat', 0)]
    """
    order = {title: i for i, title in reversed(list(enumerate(it.title.strip() for it in catalogue)))}
    counts = Counter(t.strip() for t in train_titles)
    unknown = sorted(t for t in counts if t not in order)
    if unknown:
        raise DataError(f"training title(s) not in the catalogue: {', '.join(map(repr, unknown[:3]))}"
                        f"{' ...' if len(unknown) > 3 else ''}; give the catalogue (dataset/path) of the data the "
                        "feedback log came from")
    return sorted(((t, counts[t]) for t in order), key=lambda tc: (-tc[1], order[tc[0]]))


def _training_titles(cfg: BaselineConfig) -> list[str]:
    """The title of every training interaction: each feedback row's response, as the evaluator extracts it."""
    from gcsl.data.load import read_feedback

    table, _ = read_feedback(cfg.feedback, prompt_column=cfg.prompt_column, response_column=cfg.response_column,
                             score_column=cfg.score_column, fmt=cfg.data_format)
    titles = []
    for i, response in enumerate(table.column("response").to_pylist(), start=1):
        title = extract_title(response) if isinstance(response, str) else None
        if title is None:
            raise DataError(f"{cfg.feedback}: row {i} has no item title in its response {response!r}; give the "
                            "feedback log `gcsl data recommendation` wrote")
        titles.append(title)
    if not titles:
        raise DataError(f"{cfg.feedback}: no training interactions to count")
    return titles


def _row_rng(seed: int, prompt_id: str, sample: int) -> np.random.Generator:
    digest = hashlib.sha256(prompt_id.encode("utf-8")).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little"), sample])


def write_baseline_generations(cfg: BaselineConfig) -> Path:
    """Writes ``cfg.num_samples`` baseline generations per prompt to ``cfg.out`` (atomically), and
    ``<out>.run.json`` beside it, as ``gcsl generate`` does.

    >>> write_baseline_generations(BaselineConfig(kind="most-popular", prompts="data/movielens/test_prompts.jsonl",
    ...     out=Path("gens.jsonl"), feedback="data/movielens/train.jsonl"))  # doctest: +SKIP
    PosixPath('gens.jsonl')
    """
    from gcsl.generation.generate import load_prompts

    out = Path(cfg.out)
    prompts = load_prompts(cfg.prompts, id_field=cfg.id_field, prompt_field=cfg.prompt_field, split=cfg.split,
                           limit=cfg.limit)
    catalogue = load_catalogue(cfg.dataset, cfg.path)
    if not catalogue:
        raise DataError(f"the {cfg.dataset} catalogue is empty; check --dataset/--path")
    extra: dict[str, Any] = {"catalogue_items": len(catalogue)}
    if cfg.kind == "most-popular":
        ranking = popularity_ranking(_training_titles(cfg), catalogue)
        extra["most_popular"] = [{"title": t, "count": c} for t, c in ranking[:20]]

    titles = list(dict.fromkeys(it.title.strip() for it in catalogue))
    rows = []
    for p in prompts:
        order: list[str] | None = None
        if cfg.kind == "most-popular":
            seen = history_titles(p.prompt)
            # Stable sort: popularity order, the history's titles moved behind the rest.
            order = sorted((t for t, _ in ranking), key=lambda t: t in seen)
        for sample in range(cfg.num_samples):
            if cfg.kind == "random":
                rng = _row_rng(cfg.seed, p.id, sample)
                # A ranking shuffles the distinct titles; a single draw picks an item (so a shared title is likelier).
                order = [titles[j] for j in rng.permutation(len(titles))] if cfg.rank else \
                    [catalogue[int(rng.integers(len(catalogue)))].title.strip()]
            row = {"prompt_id": p.id, "prompt": p.prompt, "goal": None, "goal_request": None,
                   "sample": sample, "completion": format_response(order[0]), "meta": p.meta}
            if cfg.rank:
                row["ranking"] = order
            rows.append(row)
    write_jsonl(out, rows)
    write_run_record(out.parent, stage=f"baseline:{cfg.kind}", config=cfg, seed=cfg.seed,
                     filename=out.name + ".run.json", extra={**extra, "complete": True, "rows": len(rows)})
    return out
