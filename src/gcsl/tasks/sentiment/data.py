"""Sentiment data: review prompts for MovieLens-100k titles, and the shipped feedback log.

``gcsl data sentiment --out DIR`` copies the shipped data (``gcsl/resources/sentiment``: the
feedback log of SmolLM2-135M-Instruct's reviews scored by VADER, and the train / test prompts) or,
with ``--source movielens``, writes fresh train / test prompt splits (a feedback log then needs a
model to write the reviews: ``scripts/make_sentiment_data.py``). ``--length-column words`` adds each
response's word count to the copied log as a column of that name (the shipped file stays as it is), so a
brevity aspect can be trained on it (configs/cpu/multi-aspect.yaml).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import random
import re
import shutil
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gcsl.config import field
from gcsl.errors import DataError, MissingDependencyError
from gcsl.runinfo import atomic_dir, write_run_record
from gcsl.stages import iter_jsonl, write_jsonl

__all__ = [
    "REVIEW_TEMPLATES",
    "SHIPPED_FILES",
    "Movie",
    "SentimentDataConfig",
    "movielens_path",
    "movielens_titles",
    "sentiment_prompt_splits",
    "write_sentiment_prompts",
    "write_sentiment_data",
    "with_length_column",
]

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
    train, test = sentiment_prompt_splits(**split_options)
    write_jsonl(train_out, train)
    write_jsonl(test_out, test)
    return {"train": len(train), "test": len(test)}


# The shipped data, in gcsl/resources/sentiment (made_by.json says how it was made).
SHIPPED_FILES = ("feedback.jsonl", "train_prompts.jsonl", "test_prompts.jsonl", "made_by.json")


@dataclass
class SentimentDataConfig:
    """Options of ``gcsl data sentiment``."""

    source: Literal["shipped", "movielens"] = field(
        "shipped", help="shipped: copy the packaged feedback log and prompts (made_by.json says how they were "
                        "made); movielens: write new train/test prompt splits from the MovieLens titles")
    test_fraction: float = field(0.2, help="movielens: share of the titles held out as test prompts")
    seed: int = field(0, help="movielens: seed of the title shuffle")
    n_train: int | None = field(None, help="movielens: keep this many train prompts (default: all)")
    n_test: int | None = field(None, help="movielens: keep this many test prompts (default: all)")
    length_column: str | None = field(
        None, help="shipped: also write each response's word count into the copied feedback log under this "
                   "column (e.g. words), for a brevity aspect; the same count as the evaluator's `words` metric")

    def validate(self) -> list[str]:
        problems = []
        if self.length_column is not None and self.source != "shipped":
            problems.append("length_column: only for --source shipped (a movielens run writes no feedback log)")
        if self.length_column in ("prompt", "response", "score"):
            problems.append(f"length_column: {self.length_column!r} is a column of the log already; choose "
                            "another name, e.g. words")
        if not 0.0 < self.test_fraction < 1.0:
            problems.append(f"test_fraction: must be between 0 and 1, got {self.test_fraction}")
        for name in ("n_train", "n_test"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1 (leave it unset to keep all)")
        return problems


def write_sentiment_data(config: SentimentDataConfig, out: Path, overwrite: bool = False) -> list[Path]:
    """The task's data builder: the shipped files, or new prompt splits, written into ``out``.

    >>> [p.name for p in write_sentiment_data(SentimentDataConfig(), Path("data/sentiment"))]  # doctest: +SKIP
    ['feedback.jsonl', 'train_prompts.jsonl', 'test_prompts.jsonl', 'made_by.json']
    """
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if config.source == "shipped":
            shipped = importlib.resources.files("gcsl") / "resources" / "sentiment"
            names = list(SHIPPED_FILES)
            for name in names:
                with importlib.resources.as_file(shipped / name) as path:
                    if name == "feedback.jsonl" and config.length_column:
                        write_jsonl(tmp / name, with_length_column(
                            (row for _, row in iter_jsonl(path, "feedback log")), config.length_column))
                    else:
                        shutil.copyfile(path, tmp / name)
        else:
            names = ["train_prompts.jsonl", "test_prompts.jsonl"]
            write_sentiment_prompts(tmp / names[0], tmp / names[1], test_fraction=config.test_fraction,
                                    seed=config.seed, n_train=config.n_train, n_test=config.n_test)
            write_run_record(tmp, stage="sentiment-data", config=config, seed=config.seed)
    return [out / name for name in names]


def with_length_column(rows: Iterable[dict[str, Any]], column: str) -> list[dict[str, Any]]:
    """Feedback rows with ``column`` added: the word count of each row's response.

    >>> with_length_column([{"prompt": "p", "response": "A dull film.", "score": 0.2}], "words")[0]["words"]
    3
    """
    from gcsl.tasks.sentiment.evaluation import word_count

    return [{**row, column: word_count(row.get("response"))} for row in rows]
