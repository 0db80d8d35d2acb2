"""Recommendation data: MovieLens-100k and D3-style Amazon ratings as chronological, sampled examples.

See :mod:`gcsl.tasks.recommendation` for the protocol (data, split, sampling).
"""

from __future__ import annotations

import ast
import csv
import importlib.util
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gcsl.config import field
from gcsl.errors import ConfigError, DataError, MissingDependencyError
from gcsl.stages import iter_jsonl

__all__ = [
    "CatalogueItem",
    "HistoryEntry",
    "Interaction",
    "RecommendationData",
    "RecommendationDataConfig",
    "D3_COLUMNS",
    "SPLITS",
    "movielens_dir",
    "load_movielens",
    "load_amazon",
    "load_catalogue",
    "load_recommendation_data",
    "split_by_time",
    "sample_splits",
    "as_number",
    "most_rated",
    "CATALOGUE_FILE",
    "read_catalogue_file",
]

# Columns D3 (Bao et al., "Decoding Matters") writes for every split; history_* hold list literals.
D3_COLUMNS = ("user_id", "item_asins", "item_asin", "history_item_id", "item_id", "history_item_title",
              "item_title", "history_rating", "rating", "history_timestamp", "timestamp")
_D3_REQUIRED = ("user_id", "history_item_id", "item_id", "history_item_title", "item_title", "history_rating",
                "rating", "history_timestamp", "timestamp")
_D3_SPLIT_DIRS = {"train": "train", "validation": "valid", "test": "test"}
SPLITS = ("train", "validation", "test")

_RECBOLE_INSTALL = "pip install --no-deps recbole==1.2.1"

# What `gcsl data recommendation` writes beside the logs: the catalogue the examples were built on (restricted
# by top_items or whole), with each item's count among the training interactions. The evaluator and the
# baselines read it when their --path is that folder, so they rank against the very same items.
CATALOGUE_FILE = "catalogue.jsonl"


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
    top_items: int = field(0, help="keep only the N most-rated items (catalogue, targets and history entries; "
                           "ratings of other items are removed before histories are built); 0 keeps every item "
                           "(the paper). A deviation from the paper's protocol that makes the task learnable by "
                           "small models")

    def validate(self) -> list[str]:
        problems = []
        if self.dataset == "amazon" and self.path is None:
            problems.append("path: the amazon dataset needs --path (a D3-style CSV file or folder)")
        if self.min_interactions < 2:
            problems.append("min_interactions: must be >= 2 (a user needs a history and a target)")
        if self.history_len < 1:
            problems.append("history_len: must be >= 1")
        if self.top_items < 0:
            problems.append("top_items: must be >= 0 (0 keeps the whole catalogue)")
        for name in ("n_train", "n_valid", "n_test"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be >= 0 (0 keeps the whole split)")
        return problems


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


def as_number(value: Any, where: str, what: str) -> float:
    """``value`` as a finite float; anything else is a DataError naming ``where`` and ``what``."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {what} {value!r} is not a number; fix the value") from None
    if not np.isfinite(x):
        raise DataError(f"{where}: {what} {value!r} is not a finite number; fix the value")
    return x


def most_rated(counts: Counter, items: Sequence[CatalogueItem], n: int) -> list[CatalogueItem]:
    """The ``n`` catalogue items with the most ratings in ``counts`` (by item id), in catalogue order; ties at
    the cut go to the item that comes first in the catalogue. ``n <= 0`` keeps every item.

    >>> items = [CatalogueItem("1", "Heat"), CatalogueItem("2", "Alien"), CatalogueItem("3", "Up")]
    >>> [it.title for it in most_rated(Counter({"3": 5, "1": 2, "2": 2}), items, 2)]
    ['Heat', 'Up']
    """
    if n <= 0 or n >= len(items):
        return list(items)
    order = sorted(range(len(items)), key=lambda i: (-counts.get(items[i].item_id, 0), i))
    return [items[i] for i in sorted(order[:n])]


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
                   history_len: int = 10, top_items: int = 0) -> RecommendationData:
    """MovieLens-100k as chronological examples split 8:1:1 by time (no sampling).

    ``top_items`` > 0 keeps the most-rated items only (:func:`most_rated` over every rating in the file);
    the other ratings are removed before users are counted and histories built.

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
        entry = HistoryEntry(item, titles[item], as_number(f[c_rating], where, "rating"))
        sequences[f[c_user]].append((line_no, entry, int(as_number(f[c_ts], where, "timestamp"))))
    dropped = {}
    if top_items > 0:
        items = most_rated(Counter(f[c_item] for _, f in rows), items, top_items)
        kept_items = {it.item_id for it in items}
        sequences = defaultdict(list, {u: [e for e in ev if e[1].item_id in kept_items] for u, ev in sequences.items()})
        dropped["ratings_outside_top_items"] = len(rows) - sum(len(ev) for ev in sequences.values())
    counts = {u: len(ev) for u, ev in sequences.items()}
    kept = {u: ev for u, ev in sequences.items() if counts[u] >= min_interactions}
    examples = [ex for _, ex in sorted(_examples_from_sequences(kept, history_len), key=lambda p: p[0])]
    splits = split_by_time(examples)
    dropped["users_below_min_interactions"] = len(sequences) - len(kept)
    stats = {"source": str(folder), "users": len(sequences), "users_kept": len(kept),
             "ratings": len(rows), "examples": len(examples), "catalogue_items": len(items), "dropped": dropped,
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
                "rating": as_number(raw["rating"], where, "rating"),
                "timestamp": int(as_number(raw["timestamp"], where, "timestamp")),
                "history": [HistoryEntry(str(i), str(t).strip(), as_number(r, where, "history_rating"))
                            for i, t, r in zip(hist["history_item_id"], hist["history_item_title"],
                                               hist["history_rating"])],
                "history_timestamps": [int(as_number(t, where, "history_timestamp"))
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
                item_noun: str = "item", top_items: int = 0) -> RecommendationData:
    """D3-style Amazon reviews: one CSV (split 8:1:1 here) or a D3 folder (its split kept).

    A user's interaction count is the number of distinct (item, timestamp) events in their rows
    (histories and targets) across the loaded files. The catalogue is ``info/*.txt`` when a D3
    folder has one, else every item seen in the rows. ``top_items`` > 0 keeps the items with the most
    such events (:func:`most_rated`): rows with another target are dropped, other history entries removed.

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
    dropped = Counter()
    if top_items > 0:
        items = most_rated(Counter(item for ev in events.values() for item, _ in ev), items, top_items)
        kept_items = {it.item_id for it in items}
        before = sum(len(ev) for ev in events.values())
        events = defaultdict(set, {u: {e for e in ev if e[0] in kept_items} for u, ev in events.items()})
        dropped["events_outside_top_items"] = before - sum(len(ev) for ev in events.values())
        for r in all_rows:
            r["history"] = [h for h in r["history"] if h.item_id in kept_items]
    kept_users = {u for u, ev in events.items() if len(ev) >= min_interactions}

    # A target's position among the user's examples, in time order across every file.
    order = sorted(((r["user_id"], r["timestamp"], k) for k, r in enumerate(all_rows)))
    position: dict[int, int] = {}
    last_user, count = None, 0
    for user, _, k in order:
        count = count + 1 if user == last_user else 1
        last_user = user
        position[k] = count

    examples_by_source: dict[str, list[Interaction]] = {}
    k = 0
    for name, rows in rows_by_source.items():
        out = []
        for r in rows:
            if top_items > 0 and r["item_id"] not in kept_items:
                dropped["rows_with_target_outside_top_items"] += 1
            elif r["user_id"] not in kept_users:
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
             "examples": sum(len(v) for v in splits.values()), "catalogue_items": len(items), "dropped": dict(dropped),
             "split_sizes": {s: len(v) for s, v in splits.items()},
             "split": "by time here (8:1:1)" if "all" in sources else "as given by the D3 folder"}
    notes = [f"dropped {n} row(s): {reason}" for reason, n in dropped.items() if reason.startswith("rows")]
    return RecommendationData("amazon", items, splits, item_noun, "bought", stats, notes)


def read_catalogue_file(folder: Path) -> tuple[list[CatalogueItem], list[int]]:
    """The catalogue a ``gcsl data recommendation`` folder was built on and each item's count among its
    training interactions (the popularity BIGRec's grounding may weigh in).

    >>> items, counts = read_catalogue_file(Path("data/movielens-rank"))  # doctest: +SKIP
    """
    path = Path(folder) / CATALOGUE_FILE
    items, counts = [], []
    for line_no, row in iter_jsonl(path, "catalogue"):
        if not isinstance(row, dict) or not isinstance(row.get("title"), str) or "item_id" not in row:
            raise DataError(f"{path}:{line_no}: expected an object with item_id, title and train_interactions; "
                            "write the folder again with `gcsl data recommendation`")
        items.append(CatalogueItem(str(row["item_id"]), row["title"].strip()))
        counts.append(int(as_number(row.get("train_interactions", 0), f"{path}:{line_no}", "train_interactions")))
    return items, counts


def load_catalogue(dataset: Literal["movielens", "amazon"], path: Path | None = None) -> list[CatalogueItem]:
    """The item catalogue generations are ranked against (every title, in source order).

    ``path`` may also be a folder written by ``gcsl data recommendation``: its ``catalogue.jsonl``
    is the catalogue, restricted (``top_items``) as its examples were.

    >>> load_catalogue("movielens")[0]  # doctest: +SKIP
    CatalogueItem(item_id='1', title='Toy Story')
    """
    if path is not None and (Path(path) / CATALOGUE_FILE).is_file():
        return read_catalogue_file(Path(path))[0]
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
                              history_len=config.history_len, top_items=config.top_items)
    else:
        if config.path is None:
            raise ConfigError("path: the amazon dataset needs --path (a D3-style CSV file or folder)")
        data = load_amazon(config.path, min_interactions=config.min_interactions, history_len=config.history_len,
                           top_items=config.top_items)
    if config.item_noun:
        data.item_noun = config.item_noun
    return sample_splits(data, config.n_train, config.n_valid, config.n_test, config.seed)
