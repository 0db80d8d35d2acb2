"""Prepare at scale: 1M feedback rows through `gcsl prepare` vs the Arrow I/O floor.

The floor is what any pipeline must pay: pyarrow reading the same JSONL and writing it as
Parquet. The ratio prepare / floor says what goal construction itself costs. Each stage runs in
its own fresh process, so its peak RSS is its own; the same rows loaded as Python dicts give the
memory a list-of-objects pipeline would need.

    python benchmarks/prepare_scale.py --rows 1000000 --method gcsl-bey-nl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

_STAGES = {
    "floor": """
        import pyarrow.json as pj, pyarrow.parquet as pq
        pq.write_table(pj.read_json(LOG), OUT + ".parquet", compression="zstd")
    """,
    "prepare": """
        from gcsl.data.prepare import PrepareConfig, prepare
        r = prepare(PrepareConfig(data=LOG, out=OUT, method=METHOD, score_range=[0.0, 1.0], quiet=True))
        extra = {"rows_in": r.rows_in, "rows_out": r.rows_out}
    """,
    "python-objects": """
        import json
        rows = [json.loads(line) for line in open(LOG)]
    """,
}
_WRAPPER = """
import json, resource, sys, time
LOG, OUT, METHOD = sys.argv[1:4]
extra = {{}}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
{body}
print(json.dumps({{"seconds": time.perf_counter() - t0, "base_mb": base / 1024,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}}))
"""


def _write_log(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    scores = np.round(rng.beta(2, 5, size=rows), 4)
    topics = rng.integers(0, 50_000, size=rows)
    with path.open("w") as fh:
        for i in range(rows):
            fh.write(json.dumps({"prompt": f"Write a short reply about topic {topics[i]}.",
                                 "response": f"Here is reply number {i} about topic {topics[i]}.",
                                 "score": float(scores[i])}) + "\n")


def _stage(name: str, log: Path, out: Path, method: str) -> dict:
    code = _WRAPPER.format(body=textwrap.dedent(_STAGES[name]))
    done = subprocess.run([sys.executable, "-c", code, str(log), str(out), method],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--method", default="gcsl-bey-nl")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        log = tmp / "log.jsonl"
        t0 = time.perf_counter()
        _write_log(log, args.rows)
        print(f"generated {args.rows:,} rows ({log.stat().st_size / 2**20:.0f} MiB JSONL) "
              f"in {time.perf_counter() - t0:.1f} s")
        runs: dict[str, list[dict]] = {"floor": [], "prepare": []}
        for r in range(args.repeats):
            for name in runs:
                runs[name].append(_stage(name, log, tmp / f"{name}{r}", args.method))
        objects = _stage("python-objects", log, tmp / "objects", args.method)

    floor = min(runs["floor"], key=lambda d: d["seconds"])
    ours = min(runs["prepare"], key=lambda d: d["seconds"])
    print(f"method {args.method}: {ours['rows_in']:,} rows in -> {ours['rows_out']:,} rows out")
    print(f"floor (pyarrow JSONL -> Parquet): {floor['seconds']:.2f} s, peak RSS {floor['peak_mb']:.0f} MiB")
    print(f"prepare:                          {ours['seconds']:.2f} s, peak RSS {ours['peak_mb']:.0f} MiB "
          f"(after imports {ours['base_mb']:.0f} MiB)")
    print(f"the same rows as Python dicts:    peak RSS {objects['peak_mb']:.0f} MiB")
    print(f"memory prepare / Python objects: {ours['peak_mb'] / objects['peak_mb']:.2f}")
    print(f"ratio prepare / floor ({args.method}, {args.rows:,} rows, best of {args.repeats}): "
          f"{ours['seconds'] / floor['seconds']:.2f}")


if __name__ == "__main__":
    main()
