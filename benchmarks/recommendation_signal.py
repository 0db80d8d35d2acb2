"""Is there anything to learn? Model-free recommenders on a `gcsl data recommendation` folder.

Before spending hours training language models on a recommendation split, check that the histories
predict the next item at all. Three rankings of the catalogue per test prompt, each with the
history's own titles ranked last:

- random: a seeded shuffle;
- most-popular: the training log's most-rated titles first;
- co-occurrence: titles that followed the prompt's history titles in the training log, counted
  (a title's count summed over the history titles), ties broken by popularity.

If co-occurrence beats most-popular by a clear margin, the histories carry a signal a model could
learn; if nothing beats random, no method comparison on that split can mean anything.

    python benchmarks/recommendation_signal.py data/movielens-top50
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from gcsl.metrics.ranking import target_hit, target_ndcg
from gcsl.metrics.stats import mean_ci
from gcsl.stages import iter_jsonl
from gcsl.tasks.recommendation.baselines import history_titles, popularity_ranking
from gcsl.tasks.recommendation.data import read_catalogue_file
from gcsl.tasks.recommendation.grounding import extract_title


def _rank_of(scores: np.ndarray, seen: list[int], target: int) -> int:
    s = scores.astype(float).copy()
    s[seen] = -np.inf  # the history's titles last
    return int((s > s[target]).sum()) + 1  # pessimistic: ties rank above the target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="a `gcsl data recommendation` output folder")
    parser.add_argument("--prompts", default="test_prompts.jsonl", help="prompt file in the folder to score")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    items, _ = read_catalogue_file(args.data)
    titles = list(dict.fromkeys(it.title for it in items))
    index = {t: i for i, t in enumerate(titles)}
    n = len(titles)
    train = [row for _, row in iter_jsonl(args.data / "train.jsonl")]
    answers = [extract_title(row["response"]).strip() for row in train]
    popularity = np.zeros(n)
    for title, count in popularity_ranking(answers, items):
        popularity[index[title]] = count
    follows = np.zeros((n, n))  # follows[h, t]: training rows whose history holds h and whose answer is t
    for row, answer in zip(train, answers):
        for h in history_titles(row["prompt"]):
            follows[index[h], index[answer]] += 1

    rng = np.random.default_rng(args.seed)
    ranks: dict[str, list[int]] = {"random": [], "most-popular": [], "co-occurrence": []}
    prompts = [row for _, row in iter_jsonl(args.data / args.prompts)]
    for row in prompts:
        seen = [index[t] for t in history_titles(row["prompt"])]
        target = index[row["target_title"].strip()]
        ranks["random"].append(_rank_of(rng.random(n), seen, target))
        ranks["most-popular"].append(_rank_of(popularity, seen, target))
        ranks["co-occurrence"].append(_rank_of(follows[seen].sum(0) + popularity / (popularity.max() + 1), seen,
                                               target))

    print(f"{args.data}: {n} titles, {len(train)} training rows, n = {len(prompts)} prompts; 95% bootstrap intervals")
    print(f"| recommender | HR@{args.k} | NDCG@{args.k} (target ideal) |")
    print("|---|---|---|")
    for name, r in ranks.items():
        r = np.array(r, dtype=float)
        hr = mean_ci(target_hit(r, args.k), seed=args.seed)
        nd = mean_ci(target_ndcg(r, np.ones_like(r), args.k), seed=args.seed)
        print(f"| {name} | {hr.mean:.3f} [{hr.low:.3f}, {hr.high:.3f}] | {nd.mean:.3f} [{nd.low:.3f}, {nd.high:.3f}] |")


if __name__ == "__main__":
    main()
