"""Steering the sentiment of short movie reviews, scored offline with VADER.

- Prompts: one per MovieLens-100k title (read from the ``ml-100k.item`` file that ships in the
  ``recbole`` wheel; the package is never imported), worded by one of a few templates chosen
  from the title so the same title always gets the same prompt. :func:`sentiment_prompt_splits`
  splits titles into train / test with a seed, so no title is in both.
- Score: VADER's compound c in [-1, 1] mapped to [0, 1] as (c + 1) / 2 for ``positive``, and
  one minus that for ``negative``: 1 is always the goal's direction.
- Check score: TextBlob's polarity, mapped the same way (``score_textblob`` per item). The
  training feedback is VADER-scored, so a model could learn VADER's quirks rather than the
  sentiment; a second scorer with its own lexicon and rules tells the two apart.
- Metrics over prompts (units: prompt ids): ``mean_score`` (mean of each prompt's mean score),
  ``mean_score_textblob`` (the same under TextBlob), ``above_threshold`` (mean of each
  prompt's fraction of generations scoring strictly above ``threshold``), ``words`` (mean of
  each prompt's mean word count: what a brevity aspect is scored by), ``dist-1/2/3`` and
  optional ``perplexity`` (:mod:`gcsl.metrics.text`).
- An empty or non-text completion scores the neutral 0.5 under both scorers, with its reason
  recorded: VADER and TextBlob give an empty text 0 (0.5 after mapping) anyway, and counting
  it as neutral neither rewards a model for saying nothing nor drops its prompt from the
  average. With the strict ``> threshold`` rule a neutral completion never counts as reaching
  the goal.

Modules: :mod:`~gcsl.tasks.sentiment.data` (titles, prompts, the shipped data) and
:mod:`~gcsl.tasks.sentiment.evaluation` (the evaluator).
"""

from __future__ import annotations

from gcsl.tasks.base import MetricSpec, Task
from gcsl.tasks.sentiment.data import (
    REVIEW_TEMPLATES,
    SHIPPED_FILES,
    Movie,
    SentimentDataConfig,
    movielens_path,
    movielens_titles,
    sentiment_prompt_splits,
    write_sentiment_data,
    write_sentiment_prompts,
)
from gcsl.tasks.sentiment.evaluation import (
    CHECK_KEY,
    NEUTRAL_SCORE,
    WORDS_KEY,
    SentimentEvalConfig,
    evaluate,
    reward_function,
    word_count,
)

__all__ = [
    "TASK",
    "NEUTRAL_SCORE",
    "CHECK_KEY",
    "WORDS_KEY",
    "word_count",
    "REVIEW_TEMPLATES",
    "SHIPPED_FILES",
    "Movie",
    "SentimentEvalConfig",
    "SentimentDataConfig",
    "movielens_path",
    "movielens_titles",
    "sentiment_prompt_splits",
    "write_sentiment_prompts",
    "write_sentiment_data",
    "evaluate",
    "reward_function",
]

TASK = Task(
    name="sentiment",
    summary="steer the sentiment of short movie reviews, scored offline by VADER (TextBlob as a check)",
    eval_config=SentimentEvalConfig,
    evaluate=evaluate,
    data_config=SentimentDataConfig,
    write_data=write_sentiment_data,
    metrics=(
        # The training feedback is VADER's score in the goal's direction: the same scale, higher = better.
        MetricSpec("mean_score", True, True, "VADER score in the goal's direction (1 = fully that sentiment), "
                   "mean per prompt, then over prompts"),
        MetricSpec(f"mean_{CHECK_KEY}", True, False, "the same under TextBlob's polarity: a second scorer "
                   "that a learned VADER quirk does not move"),
        MetricSpec("above_threshold", True, False, "share of a prompt's generations scoring strictly above "
                   "--threshold, averaged over prompts"),
        MetricSpec("words", False, False, "words per generation (whitespace-separated), mean per prompt, then "
                   "over prompts: the length a brevity aspect asks for (fewer is briefer)"),
        *(MetricSpec(f"dist-{n}", True, False, f"distinct {n}-grams over all {n}-grams of a prompt's "
                     "generations, averaged over prompts") for n in (1, 2, 3)),
        MetricSpec("perplexity", False, False, "perplexity of the generations under --reference-model"),
    ),
)
