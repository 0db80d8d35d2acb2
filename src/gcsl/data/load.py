"""Reading feedback logs (JSONL, CSV, Parquet, Hugging Face datasets) into Arrow, and validating them.

Everything stays in Arrow tables; Python objects are built only on the error path (to find the
line a problem sits on) and for chat-message prompts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gcsl.errors import DataError, MissingDependencyError
from gcsl.goals.spec import MetricSpec

__all__ = ["FeedbackLog", "read_feedback", "validate_feedback", "detect_format", "column_numpy"]

_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet",
            ".pq": "parquet"}


@dataclass
class FeedbackLog:
    """A validated feedback table with columns ``prompt``, ``response``, ``score`` (raw, float64).

    ``source`` names where it came from; ``where(i)`` names row i the way a user finds it
    (``line 7`` in a JSONL or CSV file, ``row 7`` elsewhere).
    """

    table: pa.Table
    source: str
    fmt: str
    chat: bool

    def where(self, i: int) -> str:
        if self.fmt == "jsonl":
            return f"line {_jsonl_line_of(Path(self.source), i)}"
        if self.fmt == "csv":
            return f"line {i + 2}"  # the header is line 1
        return f"row {i}"

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


def detect_format(source: str) -> str:
    path = Path(source)
    if path.is_dir():
        return "hf"
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt:
        return fmt
    if path.exists():
        raise DataError(f"{source}: unknown file type {path.suffix!r}; use .jsonl, .csv or .parquet, or set --data-format")
    return "hf"  # a hub dataset name


def _jsonl_line_of(path: Path, index: int) -> int:
    """1-based line number of the index-th record (blank lines do not hold records)."""
    seen = -1
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                seen += 1
                if seen == index:
                    return lineno
    return index + 1


def _first_bad_jsonl_line(path: Path) -> tuple[int, str]:
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                return lineno, f"not valid JSON ({exc.args[0].split(':')[0]})"
            if not isinstance(obj, dict):
                return lineno, "not a JSON object"
    return 0, "unreadable"


def _read_table(source: str, fmt: str, split: str) -> pa.Table:
    path = Path(source)
    if fmt in ("jsonl", "csv", "parquet") and not path.is_file():
        raise DataError(f"{source}: file not found; check --data")
    if fmt == "jsonl":
        import pyarrow.json as pj

        try:
            return pj.read_json(path, parse_options=pj.ParseOptions(newlines_in_values=False))
        except pa.ArrowInvalid:
            line, why = _first_bad_jsonl_line(path)
            if line:
                raise DataError(f"{source} line {line}: {why}; fix or remove the line") from None
            return _read_jsonl_python(path)
    if fmt == "csv":
        import pyarrow.csv as pcsv

        try:
            return pcsv.read_csv(path)
        except pa.ArrowInvalid as exc:
            raise DataError(f"{source}: cannot parse CSV ({str(exc).splitlines()[0]}); fix the file") from None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{source}: cannot read Parquet ({exc}); check the file") from None
    return _read_hf(source, split)


def _read_jsonl_python(path: Path) -> pa.Table:
    # pyarrow's reader rejects records whose fields change type between lines (e.g. a prompt that
    # is text in one row and chat messages in another); this slower path reports such rows.
    rows = [json.loads(line) for line in path.open("rb") if line.strip()]
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"{path}: rows disagree on a column's type ({exc}); make every row use the same types") from None


def _read_hf(source: str, split: str) -> pa.Table:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a core dependency
        raise MissingDependencyError.for_package("datasets", "reading Hugging Face datasets") from None
    path = Path(source)
    try:
        if path.is_dir() and (path / "dataset_info.json").exists() or (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(source, split=split)
    except FileNotFoundError:
        raise DataError(f"{source}: no such file, directory or dataset; check --data") from None
    except Exception as exc:  # datasets raises many types for a missing or offline hub dataset
        raise DataError(f"{source}: cannot load dataset ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                        "check the name, --split, and network access") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{source}: no split {split!r} (splits: {', '.join(ds)}); pass --split")
        ds = ds[split]
    return ds.with_format("arrow")[:]


def _is_chat(col: pa.ChunkedArray) -> bool:
    t = col.type
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def read_feedback(source: str, *, prompt_column: str = "prompt", response_column: str = "response",
                  score_column: str = "score", fmt: str = "auto", split: str = "train") -> pa.Table:
    """Reads a feedback log and renames its columns to ``prompt``, ``response``, ``score_raw``.

    Raises a one-line DataError for an unreadable file or a missing column.
    """
    fmt = detect_format(source) if fmt == "auto" else fmt
    table = _read_table(source, fmt, split)
    mapping = {"prompt": prompt_column, "response": response_column, "score_raw": score_column}
    missing = [f"--{k.split('_')[0]}-column {v!r}" for k, v in mapping.items() if v not in table.column_names]
    if missing:
        raise DataError(f"{source}: column(s) not found: {', '.join(m.split(' ', 1)[1] for m in missing)} "
                        f"(columns: {', '.join(table.column_names)}); pass {' / '.join(m.split(' ')[0] for m in missing)}")
    return pa.table({k: table.column(v) for k, v in mapping.items()}), fmt


def validate_feedback(table: pa.Table, source: str, fmt: str, spec: MetricSpec, *, bins: int) -> FeedbackLog:
    """Checks every row up front and raises one DataError listing each problem with its place and fix.

    On success returns a FeedbackLog whose ``score`` column holds raw float scores (categories
    mapped to 1..C in their given order).
    """
    log = FeedbackLog(table, source, fmt, chat=_is_chat(table.column("prompt")))
    problems: list[str] = []

    def report(mask: np.ndarray, what: str, fix: str) -> None:
        bad = np.flatnonzero(mask)
        if len(bad):
            more = f" ({len(bad)} rows like this)" if len(bad) > 1 else ""
            problems.append(f"{source} {log.where(int(bad[0]))}: {what(int(bad[0])) if callable(what) else what}{more}; {fix}")

    scores_col = table.column("score_raw")
    if spec.kind == "categorical":
        as_text = pc.cast(scores_col, pa.string()) if not pa.types.is_string(scores_col.type) else scores_col
        values = column_numpy(as_text)
        lookup = {c: i + 1 for i, c in enumerate(spec.categories)}
        mapped = np.array([lookup.get(v, np.nan) if v is not None else np.nan for v in values], dtype=np.float64)
        report(np.array([v is None for v in values]), "feedback is missing", "every row needs a category")
        report(np.array([v is not None and v not in lookup for v in values]),
               lambda i: f"unknown category {values[i]!r} (known, worst to best: {', '.join(spec.categories)})",
               "add it to --categories in order or fix the row")
        scores = mapped
    else:
        if pa.types.is_string(scores_col.type) or pa.types.is_large_string(scores_col.type):
            raw = column_numpy(scores_col)
            scores = np.array([_to_float(v) for v in raw], dtype=np.float64)
            report(np.isnan(scores) & np.array([v is not None and _to_float(v) != _to_float(v) and
                                                str(v).strip().lower() != "nan" for v in raw]),
                   lambda i: f"score {raw[i]!r} is not a number", "use numeric scores (or --kind categorical)")
        elif pa.types.is_integer(scores_col.type) or pa.types.is_floating(scores_col.type) or \
                pa.types.is_null(scores_col.type) or pa.types.is_boolean(scores_col.type):
            scores = column_numpy(pc.cast(scores_col, pa.float64())).astype(np.float64)
        else:
            raise DataError(f"{source}: score column has type {scores_col.type}; scores must be numbers "
                            "(or categories with --kind categorical)")
        report(np.isnan(scores), "score is missing or NaN", "every row needs a finite score")
        report(np.isinf(scores), "score is infinite", "every row needs a finite score")
        finite = np.isfinite(scores)
        if spec.low is not None:
            report(finite & (scores < spec.low),
                   lambda i: f"score {scores[i]:g} is below the range low {spec.low:g}", "fix the score or widen --range")
        if spec.high is not None:
            report(finite & (scores > spec.high),
                   lambda i: f"score {scores[i]:g} is above the range high {spec.high:g}", "fix the score or widen --range")
        if spec.kind == "ordinal":
            report(finite & (scores != np.round(scores)),
                   lambda i: f"ordinal score {scores[i]:g} is not a whole level", "use whole levels or --kind scalar")

    response = table.column("response")
    if not (pa.types.is_string(response.type) or pa.types.is_large_string(response.type) or pa.types.is_null(response.type)):
        raise DataError(f"{source}: response column has type {response.type}; responses must be text")
    response = pc.cast(response, pa.string())
    # utf8_is_space is true only for non-empty all-whitespace strings; no trimmed copy is made.
    empty = pc.fill_null(pc.or_(pc.equal(pc.utf8_length(response), 0), pc.utf8_is_space(response)), True)
    report(column_numpy(empty), "response is empty", "remove the row or fill in the response")
    prompt = table.column("prompt")
    if log.chat:
        empty_prompt = pc.fill_null(pc.equal(pc.list_value_length(prompt), 0), True)
    elif pa.types.is_string(prompt.type) or pa.types.is_large_string(prompt.type) or pa.types.is_null(prompt.type):
        empty_prompt = pc.fill_null(pc.equal(pc.utf8_length(pc.cast(prompt, pa.string())), 0), True)
    else:
        raise DataError(f"{source}: prompt column has type {prompt.type}; prompts must be text or chat messages "
                        "(a list of {role, content})")
    report(column_numpy(empty_prompt), "prompt is empty", "remove the row or fill in the prompt")

    n = table.num_rows
    if n < bins and spec.kind == "scalar":
        problems.append(f"{source}: {n} rows but --bins {bins}; use fewer bins or more data")
    finite_scores = scores[np.isfinite(scores)]
    if n and len(finite_scores) == n and len(np.unique(finite_scores)) < 2:
        problems.append(f"{source}: every row has the same score {finite_scores[0]:g}; goals need graded feedback "
                        "with at least two distinct scores")
    if n == 0:
        problems.append(f"{source}: no rows; give a non-empty feedback log")
    if problems:
        raise DataError(" | ".join(problems))
    log.table = table.drop_columns(["score_raw"]).append_column("score", pa.array(scores, pa.float64()))
    return log


def column_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A column as numpy without pandas (ChunkedArray.to_numpy would import it: ~0.5 s)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.to_numpy(zero_copy_only=False)


def _to_float(v: object) -> float:
    if v is None:
        return math.nan
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
