"""Goal-design search on the shipped sentiment log: prepare -> train -> probe, never on test prompts.

Holds out 20 training titles (the first 20 prompt ids by SHA-256) as a validation split, trains one
design on the other 180 titles, and probes it on the validation rows and on 80 of its own training
rows. One JSON line per design goes to stdout; each probe's files stay under --out for re-analysis.

    python scripts/probe_designs.py nl-1ep gcsl-nl '{"epochs": 1}'
    python scripts/probe_designs.py lead-nl-1ep gcsl-nl '{"epochs": 1, "prepare": {"level_words": [...],
        "templates": {"range": "Write {subject} that is {level_word} (...)."}}}'

The third argument overrides TrainConfig fields; its "prepare" key overrides PrepareConfig fields.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

from gcsl.data.prepare import PrepareConfig, prepare
from gcsl.experiments.quickstart import resource_path
from gcsl.probe import ProbeConfig, run_probe
from gcsl.training.train import TrainConfig, train

TRAIN_DEFAULTS = dict(epochs=3, per_device_batch_size=8, learning_rate=5e-4, warmup_ratio=0.05, max_length=256,
                      prefix_sharing=False, save_steps=1000, logging_steps=10, report_to="none", overwrite=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("method")
    ap.add_argument("options", nargs="?", default="{}", help="JSON: TrainConfig overrides, plus a prepare key")
    ap.add_argument("--out", type=Path, default=Path("design-runs"))
    ap.add_argument("--validation-titles", type=int, default=20)
    args = ap.parse_args()

    log = [json.loads(line) for line in resource_path("sentiment", "feedback.jsonl").read_text().splitlines()]
    ids = sorted({r["prompt_id"] for r in log}, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    held = set(ids[:args.validation_titles])
    args.out.mkdir(parents=True, exist_ok=True)
    for name, keep in (("train.jsonl", False), ("val.jsonl", True)):
        rows = [r for r in log if (r["prompt_id"] in held) == keep]
        (args.out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    options = json.loads(args.options)
    prepare_options = options.pop("prepare", {})
    run = args.out / args.name
    started = time.time()
    prepare(PrepareConfig(data=str(args.out / "train.jsonl"), out=run / "prep", method=args.method,
                          metric_name="negative sentiment", score_range=[0, 1], subject="a review",
                          best_meaning="the most negative review", quiet=True, overwrite=True, **prepare_options))
    result = train(TrainConfig(data=run / "prep", out=run / "run", **{**TRAIN_DEFAULTS, **options}))
    trained = time.time()
    probes = {split: run_probe(ProbeConfig(model=str(run / "run"), data=str(args.out / data), out=run / split,
                                           limit=limit, overwrite=True))
              for split, data, limit in (("probe", "val.jsonl", None), ("probe-train", "train.jsonl", 80))}
    print(json.dumps({"name": args.name, "method": args.method, "train": {**TRAIN_DEFAULTS, **options},
                      "prepare": prepare_options, "steps": result.global_step, "loss": result.train_loss,
                      "train_s": round(trained - started),
                      **{split: {k: p[k] for k in ("n_rows", "sensitivity", "ci_low", "ci_high", "trend", "trend_low",
                                                   "trend_high")} for split, p in probes.items()}}))


if __name__ == "__main__":
    main()
