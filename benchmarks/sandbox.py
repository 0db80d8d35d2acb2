"""Sandbox throughput and runtime stability.

1. Runs per second of a trivial solution through the full Mercury harness, with 1 and 2 sandbox
   workers, against the same program run by a bare ``python`` subprocess (the floor: no
   namespaces, no limits) in the same run.
2. Coefficient of variation (stdev / mean) of the runtime one solution reports over repeated
   sandboxed runs, for the wall clock (the harness's choice) and the CPU clock: of single runs,
   and of the statistic Beyond uses (mean, median or min over groups of 5 runs, the default
   ``repeats``). Target: <= 5 %. Bare runs of the same program, interleaved with the sandboxed
   ones, are the baseline: they show how much of the spread is the machine's load.

    python benchmarks/sandbox.py --runs 40 --repeats 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gcsl.sandbox import REPORT_FD_ENV, Sandbox, SandboxLimits
from gcsl.tasks.code import build_program, load_mercury
from gcsl.tasks.code.harness import run_outcome

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "mercury_small.jsonl"


def _bare_runs_per_second(program: str, runs: int) -> float:
    start = time.perf_counter()
    for _ in range(runs):
        subprocess.run([sys.executable, "-I", "-"], input=program.encode(), capture_output=True, check=False)
    return runs / (time.perf_counter() - start)


def _sandbox_runs_per_second(box: Sandbox, program: str, runs: int, workers: int) -> float:
    start = time.perf_counter()
    results = box.run_many([program] * runs, workers=workers)
    elapsed = time.perf_counter() - start
    bad = [r for r in results if run_outcome(r).status != "passed"]
    if bad:
        raise SystemExit(f"{len(bad)} trivial runs did not pass: {bad[0].reason or bad[0].stderr[-200:]}")
    return runs / elapsed


def _bare_runtime(program: str) -> float:
    """The runtime the harness reports when run by a plain subprocess (no sandbox, no limits)."""
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, **{REPORT_FD_ENV: str(write_fd)})
    try:
        subprocess.run(
            [sys.executable, "-I", "-"],
            input=program.encode(),
            capture_output=True,
            pass_fds=(write_fd,),
            env=env,
            check=False,
        )
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as fh:
            report = json.loads(fh.read() or b"{}")
    except BaseException:
        os.close(read_fd)
        raise
    if report.get("status") != "passed":
        raise SystemExit(f"timed solution did not pass outside the sandbox: {report}")
    return report["runtime_s"]


def _runtimes(box: Sandbox, task, code: str, clock: str, repeats: int) -> tuple[list[float], list[float]]:
    """Sandboxed and bare runtimes, alternating so that both see the same load."""
    program = build_program(task, code, clock=clock)
    boxed, bare = [], []
    for _ in range(repeats):
        out = run_outcome(box.run_python(program))
        if out.status != "passed":
            raise SystemExit(f"timed solution did not pass: {out.reason}")
        boxed.append(out.runtime_s)
        bare.append(_bare_runtime(program))
    return boxed, bare


def _cv(values: list[float]) -> float:
    return statistics.stdev(values) / statistics.fmean(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="trivial runs per throughput measurement")
    parser.add_argument("--repeats", type=int, default=40, help="runs of the timed solution for the CV")
    parser.add_argument(
        "--group", type=int, default=5, help="runs per Beyond statistic (CodeEvalConfig.repeats)"
    )
    args = parser.parse_args()

    tasks = {t.task_id: t for t in load_mercury(FIXTURE)}
    two_sum = tasks["two-sum"]
    trivial = build_program(two_sum, two_sum.references[1])  # hash map: ~1 ms of work
    box = Sandbox(SandboxLimits(timeout_s=10.0))
    print(f"sandbox: {box.description}")

    bare = _bare_runs_per_second(trivial, args.runs)
    one = _sandbox_runs_per_second(box, trivial, args.runs, workers=1)
    two = _sandbox_runs_per_second(box, trivial, args.runs, workers=2)
    print(f"trivial solution, {args.runs} runs each")
    print(f"  bare python subprocess, 1 worker : {bare:6.2f} runs/s")
    print(f"  sandbox, 1 worker                : {one:6.2f} runs/s  ({one / bare:.2f}x bare)")
    print(f"  sandbox, 2 workers               : {two:6.2f} runs/s  ({two / one:.2f}x 1 worker)")

    slow = two_sum.references[0]  # quadratic scan: ~0.1 s of timed work
    print(f"runtime stability of one solution, {args.repeats} sandboxed runs (target CV <= 5%)")
    stats = {"mean": statistics.fmean, "median": statistics.median, "min": min}
    for clock in ("wall", "cpu"):
        xs, bare_xs = _runtimes(box, two_sum, slow, clock, args.repeats)
        groups = [xs[i : i + args.group] for i in range(0, len(xs) - args.group + 1, args.group)]
        cv = _cv(xs)
        print(
            f"  {clock:4s} clock: mean {statistics.fmean(xs) * 1000:7.2f} ms  single-run CV {cv * 100:5.2f}%"
            f"  {'ok' if cv <= 0.05 else 'ABOVE TARGET'}"
        )
        print(
            f"      bare baseline (interleaved): mean {statistics.fmean(bare_xs) * 1000:7.2f} ms"
            f"  single-run CV {_cv(bare_xs) * 100:5.2f}%"
        )
        for name, fn in stats.items():
            gcv = _cv([fn(g) for g in groups])
            print(
                f"      {name:6s} of {args.group} runs ({len(groups)} groups): CV {gcv * 100:5.2f}%"
                f"  {'ok' if gcv <= 0.05 else 'ABOVE TARGET'}"
            )


if __name__ == "__main__":
    main()
