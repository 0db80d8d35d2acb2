"""Builds the shipped sentiment-steering data: prompts, and a feedback log made by the base model.

Like the paper's offline logs, every training prompt gets sampled responses from the base model
(SmolLM2-135M-Instruct, offline), each scored by the task's scorer (VADER, in the steering
direction). Train and test prompts never share a movie title.

    python scripts/make_sentiment_data.py --out src/gcsl/resources/sentiment --train 200 --test 64 --samples 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gcsl.evaluation import read_generations, write_jsonl
from gcsl.generation.generate import GenerateConfig, generate
from gcsl.scorers import VaderScorer
from gcsl.tasks.sentiment import sentiment_prompt_splits


def _chat(rows: list[dict]) -> list[dict]:
    # An instruct model is prompted through its chat template, at training and at generation alike.
    return [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("src/gcsl/resources/sentiment"))
    ap.add_argument("--train", type=int, default=200, help="training prompts")
    ap.add_argument("--test", type=int, default=64, help="held-out prompts")
    ap.add_argument("--samples", type=int, default=2, help="base-model responses per training prompt")
    ap.add_argument("--direction", default="negative", choices=["positive", "negative"])
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    train, test = sentiment_prompt_splits(seed=args.seed, n_train=args.train, n_test=args.test)
    write_jsonl(args.out / "train_prompts.jsonl", _chat(train))
    write_jsonl(args.out / "test_prompts.jsonl", _chat(test))

    gens = args.out / "base_generations.jsonl"
    generate(GenerateConfig(model=args.model, prompts=str(args.out / "train_prompts.jsonl"), out=gens,
                            num_samples=args.samples, max_new_tokens=args.max_new_tokens, batch_size=16,
                            seed=args.seed))
    rows = read_generations(gens)
    scores = VaderScorer(args.direction).score([r["completion"] for r in rows])
    log = [{"prompt_id": r["prompt_id"], "sample": r["sample"], "prompt": r["prompt"], "response": r["completion"],
            "score": round(s, 4)} for r, s in zip(rows, scores) if s is not None and r["completion"].strip()]
    write_jsonl(args.out / "feedback.jsonl", log)
    gens.unlink()
    mean = sum(r["score"] for r in log) / len(log)
    info = {"model": args.model, "direction": args.direction, "scorer": f"vader-{args.direction}",
            "train_prompts": len(train), "test_prompts": len(test), "samples_per_prompt": args.samples,
            "max_new_tokens": args.max_new_tokens, "top_p": 0.9, "temperature": 1.0, "seed": args.seed,
            "feedback_rows": len(log), "dropped_empty_or_unscored": len(rows) - len(log), "mean_score": round(mean, 4),
            "command": "python scripts/make_sentiment_data.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())}
    (args.out / "made_by.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
