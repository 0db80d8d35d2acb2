"""Reading feedback logs (JSONL, CSV, Parquet, Hugging Face datasets) into Arrow, and validating them.

Everything stays in Arrow tables; Python objects are built only on the error path (to find the
line a problem sits on) and for chat-message prompts.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gcsl.errors import DataError, MissingDependencyError
from gcsl.goals.spec import MetricSpec

__all__ = ["FeedbackLog", "read_feedback", "validate_feedback", "detect_format", "column_numpy"]

_NUMBER = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$"
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
            return f"line {_csv_line_of(Path(self.source), i)}"
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


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


class _DuplicateKey(ValueError):
    pass


def _json_kind(value: object) -> str | None:
    """What a JSON value is, in words; None for null (it fits any column)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "an object" if isinstance(value, dict) else "a list"


def _json_kinds(value: object, path: str) -> Iterator[tuple[str, str]]:
    """(path, kind) for a value and everything inside it: ``prompt[].content`` is a message's content."""
    kind = _json_kind(value)
    if kind is not None:
        yield path, kind
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _json_kinds(inner, f"{path}.{key}")
    elif isinstance(value, list):
        for inner in value:
            yield from _json_kinds(inner, f"{path}[]")


def _first_bad_jsonl_line(path: Path) -> tuple[int, str]:
    """The first line that is not one UTF-8 JSON object with unique keys and the same types as the lines before.

    Returns ``(0, "")`` when every line is fine, ``(-1, "")`` when no line holds a record.
    """
    kinds: dict[str, tuple[str, int]] = {}
    records = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return lineno, f"not valid UTF-8 (byte {exc.start + 1} of the line); save the file as UTF-8"
            try:
                obj = json.loads(text, object_pairs_hook=_unique_keys)
            except _DuplicateKey as exc:
                return lineno, f"key {exc.args[0]!r} appears twice in one object; keep one"
            except ValueError as exc:
                return lineno, f"not valid JSON ({exc.args[0].split(':')[0]}); fix or remove the line"
            if not isinstance(obj, dict):
                return lineno, "not a JSON object; write one {...} object per line"
            try:
                text.encode("utf-8")
                json.dumps(obj, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                return lineno, "holds a lone surrogate escape (e.g. \\ud800), which is not text; fix the escape"
            records += 1
            for key, value in obj.items():
                for path_, kind in _json_kinds(value, key):
                    first = kinds.setdefault(path_, (kind, lineno))
                    if first[0] != kind:
                        where = "earlier on this line" if first[1] == lineno else f"on line {first[1]}"
                        return lineno, (f"{path_!r} is {kind} here but {first[0]} {where}; "
                                        "make every row use the same type")
    return (0, "") if records else (-1, "")


def _read_table(source: str, fmt: str, split: str) -> pa.Table:
    path = Path(source)
    if fmt in ("jsonl", "csv", "parquet"):
        if not path.is_file():
            raise DataError(f"{source}: file not found; check --data")
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            why = "permission denied" if isinstance(exc, PermissionError) else exc.strerror or type(exc).__name__
            raise DataError(f"{source}: cannot open the file ({why}); make it readable or check --data") from None
    if fmt == "jsonl":
        return _read_jsonl(path, source)
    if fmt == "csv":
        return _read_csv(path, source)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{source}: cannot read Parquet ({exc}); check the file") from None
    return _read_hf(source, split)


def _jsonl_problem(path: Path, source: str) -> None:
    """Raises the DataError for the first bad line of a JSONL file, if it has one."""
    line, why = _first_bad_jsonl_line(path)
    if line > 0:
        raise DataError(f"{source} line {line}: {why}")
    if line < 0:
        raise DataError(f"{source}: the file is empty (no JSON records); give one JSON object per line")


def _read_jsonl(path: Path, source: str) -> pa.Table:
    import pyarrow.json as pj

    try:
        table = pj.read_json(path, parse_options=pj.ParseOptions(newlines_in_values=False))
    except pa.ArrowInvalid:
        _jsonl_problem(path, source)
        return _read_jsonl_python(path, source)  # e.g. a line longer than the reader's block
    try:
        table.validate(full=True)  # the reader passes invalid UTF-8 through (in values and in keys)
    except (pa.ArrowInvalid, UnicodeDecodeError):
        _jsonl_problem(path, source)
        raise DataError(f"{source}: holds text that is not valid UTF-8; save the file as UTF-8") from None
    if table.num_columns == 0 or table.num_rows != _jsonl_record_lines(path):
        # The reader takes an object split over several lines as one record: that is not JSON Lines,
        # and every later line number would be off.
        _jsonl_problem(path, source)
    return table


def _jsonl_record_lines(path: Path) -> int:
    """Non-blank lines of a file (counted fast when no line is blank)."""
    data = path.read_bytes()
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    if b"\n\n" not in data and not data.startswith(b"\n") and not data[-2:].isspace():
        return lines
    return sum(1 for line in data.split(b"\n") if line.strip())


def _read_jsonl_python(path: Path, source: str) -> pa.Table:
    # Only reached once every line has been checked (UTF-8, one object, unique keys, same types).
    with path.open("rb") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"{source}: rows disagree on a nested value's type ({str(exc).splitlines()[0][:160]}); "
                        "make every row use the same types") from None


def _csv_records(path: Path, source: str) -> Iterator[tuple[int, list[str]]]:
    """Each non-blank CSV record with the physical line it starts on (quoted newlines span lines)."""
    state = {"line": 0}

    def lines() -> Iterator[str]:
        with path.open("rb") as fh:
            for raw in fh:
                state["line"] += 1
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{source} line {state['line']}: not valid UTF-8 (byte {exc.start + 1} of the "
                                    "line); save the file as UTF-8") from None
                yield text.removeprefix("\ufeff") if state["line"] == 1 else text

    limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        reader = csv.reader(lines())
        start = 1
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise DataError(f"{source} line {start}: cannot parse CSV ({exc}); fix the line") from None
            if record:
                yield start, record
            start = state["line"] + 1
    finally:
        csv.field_size_limit(limit)


def _csv_line_of(path: Path, index: int) -> int:
    """Physical line of the index-th data row of a CSV file (after the header; blank lines hold no row)."""
    for i, (line, _) in enumerate(_csv_records(path, str(path))):
        if i == index + 1:
            return line
    return index + 2


def _read_csv(path: Path, source: str) -> pa.Table:
    """Every column as text: only the score column is parsed as numbers, later and strictly."""
    import pyarrow.csv as pcsv

    header = next(iter(_csv_records(path, source)), (1, []))[1]
    if not header:
        raise DataError(f"{source}: the file is empty (no header line); give a header line and one row per line")
    for name in header:
        if header.count(name) > 1:
            raise DataError(f"{source} line 1: column {name!r} appears {header.count(name)} times in the header; "
                            "give each column a distinct name")
    convert = pcsv.ConvertOptions(column_types={name: pa.string() for name in header})
    parse = pcsv.ParseOptions(newlines_in_values=True)
    read = pcsv.ReadOptions()
    while True:
        try:
            return pcsv.read_csv(path, read_options=read, parse_options=parse, convert_options=convert)
        except pa.ArrowInvalid as exc:
            size = path.stat().st_size + 1
            if "straddl" in str(exc) and read.block_size < size:
                read = pcsv.ReadOptions(block_size=min(size, 2**31 - 1))  # a field longer than a block
                continue
            for line, record in _csv_records(path, source):
                if len(record) != len(header):
                    raise DataError(f"{source} line {line}: {len(record)} fields but the header has {len(header)}; "
                                    "quote fields that hold commas or fix the line") from None
            raise DataError(f"{source}: cannot parse CSV ({str(exc).splitlines()[0][:160]}); fix the file") from None


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
                  score_column: str = "score", fmt: str = "auto", split: str = "train",
                  aspect_columns: tuple[str, ...] = ()) -> pa.Table:
    """Reads a feedback log and renames its columns to ``prompt``, ``response``, ``score_raw``.

    ``aspect_columns`` (multi-aspect goals) are kept too, each as ``aspect:<column>``, read like the score.
    Raises a one-line DataError for an unreadable file or a missing column.
    """
    fmt = detect_format(source) if fmt == "auto" else fmt
    table = _read_table(source, fmt, split)
    for name in table.column_names:
        if table.column_names.count(name) > 1:
            raise DataError(f"{source}: column {name!r} appears {table.column_names.count(name)} times; "
                            "give each column a distinct name")
    mapping = {"prompt": prompt_column, "response": response_column, "score_raw": score_column}
    # An aspect's column is named by its --aspect (the first aspect's is also the score column).
    missing = [f"--{k.split('_')[0]}-column {v!r}" for k, v in mapping.items()
               if v not in table.column_names and v not in aspect_columns]
    missing += [f"--aspect(column=) {c!r}" for c in aspect_columns if c not in table.column_names]
    mapping.update({f"aspect:{c}": c for c in aspect_columns})
    if missing:
        raise DataError(f"{source}: column(s) not found: {', '.join(m.split(' ', 1)[1] for m in missing)} "
                        f"(columns: {', '.join(table.column_names)}); pass {' / '.join(m.split(' ')[0] for m in missing)}")
    columns = {k: table.column(v) for k, v in mapping.items()}
    # Parquet and datasets may store text dictionary-encoded; the values are what count.
    columns = {k: c.cast(c.type.value_type) if pa.types.is_dictionary(c.type) else c for k, c in columns.items()}
    if fmt == "csv":
        columns = {k: _csv_numbers(c) if k == "score_raw" or k.startswith("aspect:") else c for k, c in columns.items()}
    return pa.table(columns), fmt


def _trim_spaces(col):
    """Spaces and tabs around a CSV cell; not Unicode's wider whitespace, which str.strip also takes (a control
    character such as U+001C before a number must keep it from reading as one)."""
    return pc.utf8_trim(col, characters=" \t")


def _csv_numbers(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A CSV text column as int64 or float64 when every non-blank cell is a plain number (blank: null);
    otherwise unchanged, for validation to name the cell that is not a number (or to read categories)."""
    text = _trim_spaces(col)
    blank = pc.equal(pc.utf8_length(text), 0)
    if not pc.all(pc.or_(blank, pc.match_substring_regex(text, _NUMBER))).as_py():
        return col
    text = pc.if_else(blank, pa.scalar(None, pa.string()), text)
    whole = pc.all(pc.or_kleene(pc.is_null(text), pc.match_substring_regex(text, r"^[+-]?[0-9]{1,18}$"))).as_py()
    return pc.cast(text, pa.int64() if whole else pa.float64())


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
        if (pa.types.is_string(scores_col.type) or pa.types.is_large_string(scores_col.type)) and fmt == "csv":
            # CSV has no types: a score is a plain decimal number (1, -0.5, 2e3); "1_0", "0x10", "true" are not.
            text = _trim_spaces(pc.cast(scores_col, pa.string()))
            numeric = pc.fill_null(pc.match_substring_regex(text, _NUMBER), False)
            scores = column_numpy(pc.cast(pc.if_else(numeric, text, pa.scalar(None, pa.string())),
                                          pa.float64())).astype(np.float64)
            blank = column_numpy(pc.fill_null(pc.equal(pc.utf8_length(text), 0), True))
            raw = column_numpy(scores_col)
            not_number = ~column_numpy(numeric) & ~blank
            report(not_number, lambda i: f"score {raw[i]!r} is not a number",
                   "write a plain number such as 0.5 or 3 (or use --kind categorical)")
        elif pa.types.is_string(scores_col.type) or pa.types.is_large_string(scores_col.type):
            raw = column_numpy(scores_col)
            scores = np.full(len(raw), np.nan)
            not_number = np.array([v is not None for v in raw], dtype=bool)
            report(not_number, lambda i: f"score {raw[i]!r} is text, not a number",
                   "write scores as numbers without quotes (or use --kind categorical)")
        elif pa.types.is_boolean(scores_col.type):
            raw = column_numpy(scores_col)
            scores = np.full(len(raw), np.nan)
            not_number = np.array([v is not None for v in raw], dtype=bool)
            report(not_number,
                   lambda i: f"score {str(raw[i]).lower()} is true/false, not a number",
                   "write scores as numbers (e.g. 0 and 1), or use --kind categorical --categories false true")
        elif pa.types.is_integer(scores_col.type) or pa.types.is_floating(scores_col.type) or \
                pa.types.is_null(scores_col.type):
            scores = column_numpy(pc.cast(scores_col, pa.float64())).astype(np.float64)
            not_number = np.zeros(len(scores), dtype=bool)
        else:
            raise DataError(f"{source}: score column has type {scores_col.type}; scores must be numbers "
                            "(or categories with --kind categorical)")
        report(np.isnan(scores) & ~not_number, "score is missing or NaN", "every row needs a finite score")
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
        messages = prompt.to_pylist()
        bad = [_chat_problem(m) for m in messages]
        report(np.array([b is not None for b in bad], dtype=bool), lambda i: bad[i],
               "give each prompt as a list of {\"role\": ..., \"content\": \"text\"} messages")
        empty_prompt = np.array([b is None and not any(m["content"].strip() for m in p) for b, p in zip(bad, messages)],
                                dtype=bool)
    elif pa.types.is_string(prompt.type) or pa.types.is_large_string(prompt.type) or pa.types.is_null(prompt.type):
        text = pc.cast(prompt, pa.string())
        empty_prompt = pc.fill_null(pc.or_(pc.equal(pc.utf8_length(text), 0), pc.utf8_is_space(text)), True)
    else:
        raise DataError(f"{source}: prompt column has type {prompt.type}; prompts must be text or chat messages "
                        "(a list of {role, content})")
    report(column_numpy(empty_prompt) if not isinstance(empty_prompt, np.ndarray) else empty_prompt,
           "prompt is empty", "remove the row or fill in the prompt")

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


def _chat_problem(messages: list | None) -> str | None:
    """What is wrong with one chat prompt (a list of role/content messages), or None."""
    if not messages:
        return "prompt is empty"
    for j, m in enumerate(messages, start=1):
        if not isinstance(m, dict):
            return f"prompt message {j} is {_json_kind(m) or 'null'}, not a {{role, content}} message"
        if not isinstance(m.get("role"), str) or not m["role"].strip():
            return f"prompt message {j} has no role"
        if m.get("content") is None:
            return f"prompt message {j} has no content"
        if not isinstance(m["content"], str):
            return f"prompt message {j} has content {_json_kind(m['content']) or 'null'}, not text"
    return None


def column_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A column as numpy without pandas (ChunkedArray.to_numpy would import it: ~0.5 s)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.to_numpy(zero_copy_only=False)
