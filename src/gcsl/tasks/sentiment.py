"""Steering the sentiment of short movie reviews, scored offline with VADER.

- Prompts: one per MovieLens-100k title (read from the ``ml-100k.item`` file that ships in the
  ``recbole`` wheel; the package is never imported), worded by one of a few templates chosen
  from the title so the same title always gets the same prompt. :func:`sentiment_prompt_splits`
  splits titles into train / test with a seed, so no title is in both.
- Score: VADER's compound c in [-1, 1] mapped to [0, 1] as (c + 1) / 2 for ``positive``, and
  one minus that for ``negative``: 1 is always the goal's direction.
- Check score: TextBlob's polarity, mapped the same way (``score_textblob`` per item). The
  training feedback is VADER-scored, so a model could learn VADER's quirks rather than the
  sentiment; a second scorer with its own lexicon and rules tells the two apart.
- Metrics over prompts (units: prompt ids): ``mean_score`` (mean of each prompt's mean score),
  ``mean_score_textblob`` (the same under TextBlob), ``above_threshold`` (mean of each
  prompt's fraction of generations scoring strictly above ``threshold``), ``dist-1/2/3`` and
  optional ``perplexity`` (:mod:`gcsl.metrics.text`).
- An empty or non-text completion scores the neutral 0.5 under both scorers, with its reason
  recorded: VADER and TextBlob give an empty text 0 (0.5 after mapping) anyway, and counting
  it as neutral neither rewards a model for saying nothing nor drops its prompt from the
  average. With the strict ``> threshold`` rule a neutral completion never counts as reaching
  the goal.
"""

from __future__ import annotations

import importlib.util
import math
import random
import re
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gcsl.config import config_to_dict, field
from gcsl.errors import DataError, MissingDependencyError
from gcsl.metrics.text import TextQualityOptions, text_quality
from gcsl.scorers import TextBlobScorer, VaderScorer
from gcsl.tasks.base import TaskResult, TextScorer, score_generations

__all__ = [
    "NEUTRAL_SCORE",
    "CHECK_KEY",
    "REVIEW_TEMPLATES",
    "Movie",
    "SentimentEvalConfig",
    "movielens_path",
    "movielens_titles",
    "sentiment_prompt_splits",
    "write_sentiment_prompts",
    "evaluate",
]

NEUTRAL_SCORE = 0.5
# Item key of the TextBlob check score; its per-prompt mean is the metric ``mean_score_textblob``.
CHECK_KEY = "score_textblob"
REVIEW_TEMPLATES = (
    'Write a short review of the movie "{title}".',
    'Write a short review of the film "{title}" ({year}).',
    'In two or three sentences, review the movie "{title}".',
    'Share your opinion of the movie "{title}" in a short review.',
)
_RECBOLE_INSTALL = "pip install --no-deps recbole==1.2.1"
# MovieLens files a title's leading article after a comma ("Usual Suspects, The")
_TRAILING_ARTICLE = re.compile(r"^(?P<title>.+), (?P<article>The|A|An|La|Le|Les|Il|El|Das|Der|Die)(?P<rest> \(.*\))?$")


@dataclass(frozen=True)
class Movie:
    """One MovieLens item: ``title`` reads naturally ("The Usual Suspects")."""

    item_id: str
    title: str
    year: int
    genres: tuple[str, ...]


@dataclass
class SentimentEvalConfig(TextQualityOptions):
    """How movie-review generations are scored."""

    direction: Literal["positive", "negative"] = field(
        "positive", help="sentiment the goal asks for; scores are 1 for fully that sentiment")
    threshold: float = field(0.5, help="a generation reaches the goal when its score is strictly above this")

    def validate(self) -> list[str]:
        problems = self.quality_problems()
        if not 0.0 <= self.threshold <= 1.0:
            problems.append(f"threshold: must be within [0, 1], got {self.threshold}")
        return problems


def movielens_path() -> Path:
    """The ``ml-100k.item`` file inside the installed ``recbole`` wheel (recbole is not imported).

    >>> movielens_path().name
    'ml-100k.item'
    """
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError.for_package("recbole", "the MovieLens movie titles", _RECBOLE_INSTALL)
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k" / "ml-100k.item"
    if not path.is_file():
        raise MissingDependencyError(f"{path}: MovieLens file missing from the recbole install; reinstall it with "
                                     f"`{_RECBOLE_INSTALL}`")
    return path


def _natural_title(raw: str) -> str:
    m = _TRAILING_ARTICLE.match(raw.strip())
    if not m:
        return raw.strip()
    return f"{m['article']} {m['title']}{m['rest'] or ''}"


def movielens_titles(path: Path | None = None) -> tuple[list[Movie], int]:
    """Movies of an ``ml-100k.item`` file (tab-separated, typed header) and how many rows were skipped.

    Rows without a title or a numeric year are skipped (MovieLens has an "unknown" item and one
    whose year reads "V").

    >>> movies, skipped = movielens_titles()
    >>> movies[0].title, skipped
    ('Toy Story', 2)
    """
    path = Path(path) if path is not None else movielens_path()
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise DataError(f"{path}: empty file; expected a MovieLens .item file with a typed header")
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    missing = [c for c in ("item_id", "movie_title", "release_year") if c not in header]
    if missing:
        raise DataError(f"{path}:1: header lacks {', '.join(missing)}; expected item_id:token, movie_title:token_seq, "
                        "release_year:token, class:token_seq")
    col = {name: i for i, name in enumerate(header)}
    movies, skipped = [], 0
    for line in lines[1:]:
        parts = line.split("\t")
        if len(parts) < len(header):
            skipped += 1
            continue
        title = parts[col["movie_title"]].strip()
        year = parts[col["release_year"]].strip()
        if not title or not year.isdigit():
            skipped += 1
            continue
        genres = tuple(parts[col["class"]].split()) if "class" in col else ()
        movies.append(Movie(parts[col["item_id"]].strip(), _natural_title(title), int(year), genres))
    return movies, skipped


def _prompt_row(movie: Movie) -> dict[str, Any]:
    # crc32, not hash(): Python salts str hashes per process
    k = zlib.crc32(movie.title.encode("utf-8")) % len(REVIEW_TEMPLATES)
    return {"id": f"ml100k-{movie.item_id}", "prompt": REVIEW_TEMPLATES[k].format(title=movie.title, year=movie.year),
            "title": movie.title, "year": movie.year, "genres": list(movie.genres), "template": k}


def sentiment_prompt_splits(*, test_fraction: float = 0.2, seed: int = 0, n_train: int | None = None,
                            n_test: int | None = None,
                            movies: Sequence[Movie] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and test prompt rows over disjoint titles (one prompt per distinct title).

    Titles are compared case-insensitively; a title that names several movies keeps its first.
    The titles are shuffled with ``seed``, the first ``test_fraction`` go to test, and
    ``n_train`` / ``n_test`` then keep the first that many of each split.

    >>> train, test = sentiment_prompt_splits(seed=0)
    >>> not {r["title"] for r in train} & {r["title"] for r in test}
    True
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction: must be between 0 and 1, got {test_fraction}")
    if movies is None:
        movies, _ = movielens_titles()
    unique: dict[str, Movie] = {}
    for m in movies:
        unique.setdefault(m.title.casefold(), m)
    keys = sorted(unique)
    random.Random(seed).shuffle(keys)
    n_test_titles = max(1, round(len(keys) * test_fraction))
    if n_test_titles >= len(keys):
        raise DataError(f"only {len(keys)} distinct title(s): too few to split with test_fraction {test_fraction}")
    test = [_prompt_row(unique[k]) for k in keys[:n_test_titles]]
    train = [_prompt_row(unique[k]) for k in keys[n_test_titles:]]
    return train[:n_train] if n_train is not None else train, test[:n_test] if n_test is not None else test


def write_sentiment_prompts(train_out: Path, test_out: Path, **split_options: Any) -> dict[str, int]:
    """Writes the train and test prompt files of :func:`sentiment_prompt_splits`; returns their sizes.

    >>> write_sentiment_prompts(Path("train.jsonl"), Path("test.jsonl"), n_test=200)  # doctest: +SKIP
    {'train': 1262, 'test': 200}
    """
    from gcsl.evaluation import write_jsonl

    train, test = sentiment_prompt_splits(**split_options)
    write_jsonl(train_out, train)
    write_jsonl(test_out, test)
    return {"train": len(train), "test": len(test)}


def evaluate(rows: Sequence[dict[str, Any]], config: SentimentEvalConfig, *, scorer: TextScorer | None = None,
             model: Any = None, tokenizer: Any = None) -> TaskResult:
    """Sentiment metrics of generation rows (units: prompt ids); see the module docstring.

    >>> rows = [{"prompt_id": "m1", "prompt": "Review Heat.", "completion": "A wonderful, great film."},
    ...         {"prompt_id": "m1", "prompt": "Review Heat.", "completion": ""}]
    >>> evaluate(rows, SentimentEvalConfig()).metrics["above_threshold"]
    0.5
    """
    scorer = scorer or VaderScorer(config.direction)
    check = TextBlobScorer(config.direction)
    items = score_generations(rows, scorer)
    checked = score_generations(rows, check, key=CHECK_KEY)
    for item, other in zip(items, checked):  # a review a scorer cannot read counts as neither direction
        if item["score"] is None:
            item.update(score=NEUTRAL_SCORE, status="neutral",
                        reason=f"{item['reason']}; scored neutral {NEUTRAL_SCORE}")
        item[CHECK_KEY] = other[CHECK_KEY]
        if other[CHECK_KEY] is None:
            item.update({CHECK_KEY: NEUTRAL_SCORE,
                         f"{CHECK_KEY}_reason": f"{other['reason']}; scored neutral {NEUTRAL_SCORE}"})

    by_prompt: dict[str, list[float]] = defaultdict(list)
    check_by_prompt: dict[str, list[float]] = defaultdict(list)
    for item in items:
        by_prompt[item["prompt_id"]].append(item["score"])
        check_by_prompt[item["prompt_id"]].append(item[CHECK_KEY])
    mean_score = {pid: sum(s) / len(s) for pid, s in by_prompt.items()}
    mean_check = {pid: sum(s) / len(s) for pid, s in check_by_prompt.items()}
    above = {pid: sum(1 for x in s if x > config.threshold) / len(s) for pid, s in by_prompt.items()}
    metrics = {"mean_score": sum(mean_score.values()) / len(mean_score) if mean_score else math.nan,
               f"mean_{CHECK_KEY}": sum(mean_check.values()) / len(mean_check) if mean_check else math.nan,
               "above_threshold": sum(above.values()) / len(above) if above else math.nan}
    unit_scores = {"mean_score": mean_score, f"mean_{CHECK_KEY}": mean_check, "above_threshold": above}
    notes = [f"sentiment scorer: {scorer.name} ({config.direction}: 1 = fully {config.direction}); "
             f"check scorer: {check.name} (mean_{CHECK_KEY}, same mapping)"]
    neutral = sum(1 for it in items if it["status"] == "neutral")
    if neutral:
        notes.append(f"{neutral} of {len(items)} generation(s) were empty or unscorable and scored neutral "
                     f"{NEUTRAL_SCORE} (see their reason in the items)")
    check_neutral = sum(1 for it in items if it.get(f"{CHECK_KEY}_reason"))
    if check_neutral:
        notes.append(f"{check.name}: {check_neutral} of {len(items)} generation(s) were empty or unscorable and "
                     f"scored neutral {NEUTRAL_SCORE} (see {CHECK_KEY}_reason in the items)")

    text_quality(rows, config, model=model, tokenizer=tokenizer).add_to(metrics, unit_scores, items, notes)

    return TaskResult(task="sentiment", metrics=metrics, unit_scores=unit_scores, items=items,
                      n_units=len(by_prompt), n_generations=len(rows),
                      options={**config_to_dict(config), "scorer_name": scorer.name,
                               "check_scorer_name": check.name}, notes=notes)
