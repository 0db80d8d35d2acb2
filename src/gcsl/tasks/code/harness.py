"""The code harness: extracting code from a completion, the sandboxed test program, run outcomes.

Follows the Mercury harness in bigcode-evaluation-harness. A candidate is the code of the
model's completion (the first fenced block, preferring ```python, else the raw text) joined to
the task's starter code when it does not define the solution itself. Each run is one sandboxed
process (:mod:`gcsl.sandbox`); for Mercury the program pre-imports the usual helpers
(``ListNode``, ``TreeNode``, typing names, ``heapq``, ``collections``, ``sortedcontainers`` ...),
loads the solution and the task's ``convert_offline`` / ``evaluate_offline`` and times the loop
over all test cases. Statuses: :data:`HARNESS_STATUSES`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from gcsl.sandbox import Sandbox, SandboxResult
from gcsl.tasks.code.data import CodeTask

__all__ = ["HARNESS_STATUSES", "RunOutcome", "extract_code", "build_program", "run_outcome", "run_candidate"]

HARNESS_STATUSES = ("passed", "failed@load", "failed@eval", "failed@cases", "failed@timeout", "failed@error")

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
class RunOutcome:
    """One run's harness status, the reason it failed (None if it passed) and its timed runtime."""

    status: str
    reason: str | None
    runtime_s: float | None


def run_outcome(result: SandboxResult) -> RunOutcome:
    """Maps a sandbox result to a harness status; anything unexpected is ``failed@error``."""
    report = result.report or {}
    if result.status == "timeout":
        return RunOutcome("failed@timeout", result.reason, None)
    if result.status == "ok" and report.get("status") in HARNESS_STATUSES:
        runtime = result.runtime_s
        return RunOutcome(report["status"], report.get("error"), runtime)
    if result.status in ("memory_exceeded", "output_limit", "error"):
        return RunOutcome("failed@error", f"{result.status}: {result.reason}", None)
    tail = result.stderr.strip().splitlines()
    detail = f"; {tail[-1][:300]}" if tail else ""
    why = result.report_error or result.reason or "no report"
    return RunOutcome("failed@error", f"exited without a result ({why}){detail}", None)


def run_candidate(
    task: CodeTask, code: str, sandbox: Sandbox, *, clock: Literal["wall", "cpu"] = "wall"
) -> tuple[str, str | None, float | None]:
    """Runs one candidate once: ``(status, reason, runtime_s)``; never raises for the code's behaviour.

    >>> run_candidate(task, "class Solution: ...", Sandbox())   # doctest: +SKIP
    ('failed@load', "AttributeError: 'Solution' object has no attribute 'twoSum'", None)
    """
    out = run_outcome(sandbox.run_python(build_program(task, code, clock=clock)))
    return out.status, out.reason, out.runtime_s
