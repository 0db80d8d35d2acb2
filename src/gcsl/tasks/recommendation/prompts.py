"""Recommendation prompts and files: the history prompt, the quoted title answer, feedback logs and prompt files.

``gcsl data recommendation --out DIR`` writes everything an experiment needs
(:func:`export_recommendation_files`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gcsl.runinfo import atomic_dir, write_run_record
from gcsl.stages import write_jsonl
from gcsl.tasks.recommendation.data import (
    CATALOGUE_FILE,
    HistoryEntry,
    Interaction,
    RecommendationData,
    RecommendationDataConfig,
    load_recommendation_data,
    read_catalogue_file,
)

__all__ = [
    "build_prompt",
    "format_response",
    "catalogue_answers",
    "feedback_rows",
    "prompt_rows",
    "write_feedback_log",
    "write_prompts",
    "export_recommendation_files",
    "write_recommendation_data",
]


def _plural(noun: str) -> str:
    return noun if noun.endswith("s") else noun + "s"


def _stars(rating: float) -> str:
    value = f"{rating:g}"
    return f"{value} star" if rating == 1 else f"{value} stars"


def build_prompt(history: Sequence[HistoryEntry], *, item_noun: str = "movie", verb: str = "watched",
                 scale: tuple[int, int] = (1, 5)) -> str:
    """The recommendation request for one history (oldest first).

    >>> print(build_prompt([HistoryEntry("1", "Toy Story", 5.0), HistoryEntry("2", "GoldenEye", 1.0)]))
    The user has watched and rated these movies (1-5 stars), oldest first:
    1. "Toy Story": 5 stars
    2. "GoldenEye": 1 star
    Recommend one movie the user will like next. Answer with the title in quotes.
    """
    lines = [f"The user has {verb} and rated these {_plural(item_noun)} ({scale[0]}-{scale[1]} stars), oldest first:"]
    lines += [f"{i}. {format_response(h.title)}: {_stars(h.rating)}" for i, h in enumerate(history, start=1)]
    lines.append(f"Recommend one {item_noun} the user will like next. Answer with the title in quotes.")
    return "\n".join(lines)


def format_response(title: str) -> str:
    """A title in double quotes, as prompts show it and the model should answer; curly quotes when the
    title itself holds a straight double quote, so :func:`extract_title` gets the whole title back.

    >>> format_response("Heat"), format_response('The "Black" Album')
    ('"Heat"', '“The "Black" Album”')
    """
    return f"“{title}”" if '"' in title else f'"{title}"'


def catalogue_answers(folder: Path) -> tuple[list[str], list[str]]:
    """The distinct titles of a ``gcsl data recommendation`` folder's catalogue (catalogue order) and each one
    as the prompts ask for the answer (:func:`format_response`): the candidates ``gcsl generate
    --rank-catalogue`` scores.

    >>> titles, answers = catalogue_answers(Path("data/movielens-top50"))  # doctest: +SKIP
    >>> answers[0]  # doctest: +SKIP
    '"Star Wars"'
    """
    items, _ = read_catalogue_file(Path(folder))
    titles = list(dict.fromkeys(it.title for it in items))
    return titles, [format_response(t) for t in titles]


def _prompt_value(data: RecommendationData, ex: Interaction, chat: bool) -> str | list[dict[str, str]]:
    text = build_prompt(ex.history, item_noun=data.item_noun, verb=data.verb)
    return [{"role": "user", "content": text}] if chat else text


def feedback_rows(data: RecommendationData, split: str, *, chat: bool = False) -> list[dict[str, Any]]:
    """Feedback-log rows of a split: the history prompt, the target title as response, its rating as score.

    >>> feedback_rows(data, "train")[0].keys()  # doctest: +SKIP
    dict_keys(['id', 'prompt', 'response', 'score', 'user_id', 'item_id', 'timestamp', 'split', 'dataset'])
    """
    return [{"id": ex.id, "prompt": _prompt_value(data, ex, chat), "response": format_response(ex.title),
             "score": ex.rating, "user_id": ex.user_id, "item_id": ex.item_id, "timestamp": ex.timestamp,
             "split": split, "dataset": data.name} for ex in data.splits[split]]


def prompt_rows(data: RecommendationData, split: str, *, chat: bool = False) -> list[dict[str, Any]]:
    """Prompt rows for ``gcsl generate``: id, prompt, and the target fields the evaluator reads.

    >>> prompt_rows(data, "test")[0]["target_title"]  # doctest: +SKIP
    'Heat'
    """
    return [{"id": ex.id, "prompt": _prompt_value(data, ex, chat), "target_title": ex.title,
             "target_item": ex.item_id, "target_rating": ex.rating, "user_id": ex.user_id,
             "timestamp": ex.timestamp, "dataset": data.name} for ex in data.splits[split]]


def write_feedback_log(data: RecommendationData, split: str, path: Path, *, chat: bool = False) -> int:
    """Writes a split as a feedback log for ``gcsl prepare`` (prompt, response, score + ids); returns rows.

    >>> write_feedback_log(data, "train", Path("train.jsonl"))  # doctest: +SKIP
    4096
    """
    rows = feedback_rows(data, split, chat=chat)
    write_jsonl(Path(path), rows)
    return len(rows)


def write_prompts(data: RecommendationData, split: str, path: Path, *, chat: bool = False) -> int:
    """Writes a split as a prompts file for ``gcsl generate``; returns rows.

    >>> write_prompts(data, "test", Path("test_prompts.jsonl"))  # doctest: +SKIP
    1000
    """
    rows = prompt_rows(data, split, chat=chat)
    write_jsonl(Path(path), rows)
    return len(rows)


def export_recommendation_files(config: RecommendationDataConfig, out_dir: Path, *,
                                overwrite: bool = False) -> dict[str, Path]:
    """Loads the configured data and writes everything an experiment needs into ``out_dir``.

    Files: ``train.jsonl`` and ``validation.jsonl`` (feedback logs), ``validation_prompts.jsonl``
    and ``test_prompts.jsonl`` (prompt files), ``catalogue.jsonl`` (the items the examples were built on,
    each with its count among the training examples' targets; give the folder as the evaluator's --path to
    rank against exactly these items), ``data.json`` (counts and notes), ``run.json``.

    >>> export_recommendation_files(RecommendationDataConfig(), Path("rec-data"))  # doctest: +SKIP
    """
    data = load_recommendation_data(config)
    out_dir = Path(out_dir)
    names = {"train": "train.jsonl", "validation": "validation.jsonl",
             "validation_prompts": "validation_prompts.jsonl", "test_prompts": "test_prompts.jsonl"}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_feedback_log(data, "train", tmp / names["train"], chat=config.chat)
        write_feedback_log(data, "validation", tmp / names["validation"], chat=config.chat)
        write_prompts(data, "validation", tmp / names["validation_prompts"], chat=config.chat)
        write_prompts(data, "test", tmp / names["test_prompts"], chat=config.chat)
        train_counts = Counter(ex.item_id for ex in data.splits["train"])
        write_jsonl(tmp / CATALOGUE_FILE, [{"item_id": it.item_id, "title": it.title,
                                            "train_interactions": train_counts[it.item_id]} for it in data.items])
        summary = {"dataset": data.name, "catalogue_items": len(data.items), "stats": data.stats,
                   "notes": data.notes}
        (tmp / "data.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        write_run_record(tmp, stage="recommendation-data", config=config, seed=config.seed)
    return {key: out_dir / name for key, name in names.items()}


def write_recommendation_data(config: RecommendationDataConfig, out: Path, overwrite: bool = False) -> list[Path]:
    """The task's data builder (``gcsl data recommendation``): :func:`export_recommendation_files`'s
    files, as a list (feedback logs, then prompt files, then ``catalogue.jsonl`` and ``data.json``).

    >>> write_recommendation_data(RecommendationDataConfig(n_test=100), Path("data/movielens"))  # doctest: +SKIP
    """
    files = export_recommendation_files(config, out, overwrite=overwrite)
    return [*files.values(), Path(out) / CATALOGUE_FILE, Path(out) / "data.json"]
