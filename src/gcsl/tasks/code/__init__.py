"""Efficient code generation: Mercury (pass@k and Beyond@k) and HumanEval (pass@k).

The protocol follows the Mercury harness in bigcode-evaluation-harness:

* a candidate is the code of the model's completion (the first fenced block, preferring
  ```python, else the raw text) joined to the task's starter code when it does not define the
  solution itself (:mod:`gcsl.tasks.code.harness`);
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
  first k samples' scores (:mod:`gcsl.metrics.code`); both are averaged over tasks
  (micro-average; the unit is the task) and reported per difficulty (Easy / Medium / Hard) as
  ``pass@k/Easy`` etc.

Runtimes are measured on this machine in the same evaluation, so references and candidates
share hardware; parallel ``workers`` make runs faster but add noise to the runtimes compared.

Modules: :mod:`~gcsl.tasks.code.data` (loaders, prompt files), :mod:`~gcsl.tasks.code.harness`
(the sandboxed program), :mod:`~gcsl.tasks.code.evaluation` (the evaluator).
"""

from __future__ import annotations

from gcsl.metrics.code import beyond_at_k, beyond_score, pass_at_k
from gcsl.tasks.base import MetricSpec, Task
from gcsl.tasks.code.data import (
    DIFFICULTIES,
    MERCURY_HUB,
    CodeDataConfig,
    CodeTask,
    load_code_tasks,
    load_humaneval,
    load_mercury,
    write_code_data,
    write_prompts,
)
from gcsl.tasks.code.evaluation import CodeEvalConfig, evaluate
from gcsl.tasks.code.harness import HARNESS_STATUSES, build_program, extract_code, run_candidate

__all__ = [
    "TASK",
    "CodeTask",
    "CodeEvalConfig",
    "CodeDataConfig",
    "HARNESS_STATUSES",
    "DIFFICULTIES",
    "MERCURY_HUB",
    "load_mercury",
    "load_humaneval",
    "load_code_tasks",
    "write_prompts",
    "write_code_data",
    "extract_code",
    "build_program",
    "run_candidate",
    "pass_at_k",
    "beyond_score",
    "beyond_at_k",
    "evaluate",
]

_PASS = "unbiased pass@k: the chance that at least one of k samples passes every test, averaged over tasks"
# Beyond scores runtime efficiency in [0, 1] among the task's reference solutions, the same score the
# paper's feedback log gives each training solution: the report's "beyond the top bin" check applies.
_BEYOND = "Beyond@k: mean runtime-efficiency score of the first k samples (0 if failing), averaged over tasks"

TASK = Task(
    name="code",
    summary="efficient code generation: Mercury (pass@k, Beyond@k) and HumanEval (pass@k), run sandboxed",
    eval_config=CodeEvalConfig,
    evaluate=evaluate,
    data_config=CodeDataConfig,
    write_data=write_code_data,
    metrics=(
        MetricSpec("pass@{k}", True, False, _PASS),
        MetricSpec("beyond@{k}", True, True, _BEYOND + " (Mercury only)"),
        *(MetricSpec(f"pass@{{k}}/{level}", True, False, f"pass@k over the {level} tasks")
          for level in DIFFICULTIES),
        *(MetricSpec(f"beyond@{{k}}/{level}", True, True, f"Beyond@k over the {level} tasks (Mercury only)")
          for level in DIFFICULTIES),
    ),
)
