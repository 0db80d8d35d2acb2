"""Scoring movie reviews for sentiment: VADER in the goal's direction, TextBlob as a check, dist-n.

See :mod:`gcsl.tasks.sentiment` for the scores and metrics.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gcsl.config import config_to_dict, field
from gcsl.metrics.text import TextQualityOptions, text_quality
from gcsl.scorers import TextBlobScorer, VaderScorer
from gcsl.tasks.base import TaskResult, TextScorer, score_generations

__all__ = ["NEUTRAL_SCORE", "CHECK_KEY", "WORDS_KEY", "SentimentEvalConfig", "evaluate", "reward_function",
           "word_count"]

NEUTRAL_SCORE = 0.5
# Item key of the TextBlob check score; its per-prompt mean is the metric ``mean_score_textblob``.
CHECK_KEY = "score_textblob"
# Item key of a generation's word count (a "score" key, so the experiment keeps it in items/); its
# per-prompt mean is the metric ``words``, the length a brevity aspect is scored by.
WORDS_KEY = "score_words"


def word_count(text: Any) -> int:
    """Whitespace-separated words of a text; anything but a string has none.

    The one count used for the feedback log's length column (``gcsl data sentiment --length-column``)
    and for the ``words`` metric, so a brevity goal is scored exactly as it was trained.

    >>> word_count("A dull,  dull film."), word_count(None)
    (4, 0)
    """
    return len(text.split()) if isinstance(text, str) else 0


@dataclass
class SentimentEvalConfig(TextQualityOptions):
    """How movie-review generations are scored."""

    direction: Literal["positive", "negative"] = field(
        "positive", help="sentiment the goal asks for; scores are 1 for fully that sentiment")
    threshold: float = field(0.5, help="a generation reaches the goal when its score is strictly above this")

    def validate(self) -> list[str]:
        problems = self.quality_problems()
        if not 0.0 <= self.threshold <= 1.0:
            problems.append(f"threshold: must be within [0, 1], got {self.threshold}")
        return problems


def evaluate(rows: Sequence[dict[str, Any]], config: SentimentEvalConfig, *, scorer: TextScorer | None = None,
             model: Any = None, tokenizer: Any = None) -> TaskResult:
    """Sentiment metrics of generation rows (units: prompt ids); see the module docstring.

    >>> rows = [{"prompt_id": "m1", "prompt": "Review Heat.", "completion": "A wonderful, great film."},
    ...         {"prompt_id": "m1", "prompt": "Review Heat.", "completion": ""}]
    >>> evaluate(rows, SentimentEvalConfig()).metrics["above_threshold"]
    0.5
    """
    scorer = scorer or VaderScorer(config.direction)
    check = TextBlobScorer(config.direction)
    items = score_generations(rows, scorer)
    checked = score_generations(rows, check, key=CHECK_KEY)
    for item, other in zip(items, checked):  # a review a scorer cannot read counts as neither direction
        if item["score"] is None:
            item.update(score=NEUTRAL_SCORE, status="neutral",
                        reason=f"{item['reason']}; scored neutral {NEUTRAL_SCORE}")
        item[CHECK_KEY] = other[CHECK_KEY]
        item[WORDS_KEY] = word_count(item.get("completion"))
        if other[CHECK_KEY] is None:
            item.update({CHECK_KEY: NEUTRAL_SCORE,
                         f"{CHECK_KEY}_reason": f"{other['reason']}; scored neutral {NEUTRAL_SCORE}"})

    by_prompt: dict[str, list[float]] = defaultdict(list)
    check_by_prompt: dict[str, list[float]] = defaultdict(list)
    words_by_prompt: dict[str, list[int]] = defaultdict(list)
    for item in items:
        by_prompt[item["prompt_id"]].append(item["score"])
        check_by_prompt[item["prompt_id"]].append(item[CHECK_KEY])
        words_by_prompt[item["prompt_id"]].append(item[WORDS_KEY])
    mean_score = {pid: sum(s) / len(s) for pid, s in by_prompt.items()}
    mean_check = {pid: sum(s) / len(s) for pid, s in check_by_prompt.items()}
    words = {pid: sum(s) / len(s) for pid, s in words_by_prompt.items()}
    above = {pid: sum(1 for x in s if x > config.threshold) / len(s) for pid, s in by_prompt.items()}
    metrics = {"mean_score": sum(mean_score.values()) / len(mean_score) if mean_score else math.nan,
               f"mean_{CHECK_KEY}": sum(mean_check.values()) / len(mean_check) if mean_check else math.nan,
               "above_threshold": sum(above.values()) / len(above) if above else math.nan,
               "words": sum(words.values()) / len(words) if words else math.nan}
    unit_scores = {"mean_score": mean_score, f"mean_{CHECK_KEY}": mean_check, "above_threshold": above,
                   "words": words}
    notes = [f"sentiment scorer: {scorer.name} ({config.direction}: 1 = fully {config.direction}); "
             f"check scorer: {check.name} (mean_{CHECK_KEY}, same mapping)"]
    neutral = sum(1 for it in items if it["status"] == "neutral")
    if neutral:
        notes.append(f"{neutral} of {len(items)} generation(s) were empty or unscorable and scored neutral "
                     f"{NEUTRAL_SCORE} (see their reason in the items)")
    check_neutral = sum(1 for it in items if it.get(f"{CHECK_KEY}_reason"))
    if check_neutral:
        notes.append(f"{check.name}: {check_neutral} of {len(items)} generation(s) were empty or unscorable and "
                     f"scored neutral {NEUTRAL_SCORE} (see {CHECK_KEY}_reason in the items)")

    text_quality(rows, config, model=model, tokenizer=tokenizer).add_to(metrics, unit_scores, items, notes)

    return TaskResult(task="sentiment", metrics=metrics, unit_scores=unit_scores, items=items,
                      n_units=len(by_prompt), n_generations=len(rows),
                      options={**config_to_dict(config), "scorer_name": scorer.name,
                               "check_scorer_name": check.name}, notes=notes)


def reward_function(config: SentimentEvalConfig) -> Callable[[list[str]], list[float]]:
    """The evaluator's per-generation score as an online reward: VADER in ``config.direction``.

    Each completion gets exactly the ``score`` :func:`evaluate` gives its item (an empty or unreadable
    one the neutral 0.5), so online methods (grpo, rloo) optimise the metric they are reported on.

    >>> reward = reward_function(SentimentEvalConfig(direction="negative"))
    >>> reward(["", "A dreadful, awful film."])[0], reward(["A dreadful, awful film."])[0] > 0.5
    (0.5, True)
    """
    scorer = VaderScorer(config.direction)

    def reward(completions: list[str]) -> list[float]:
        items = score_generations([{"prompt_id": i, "completion": c} for i, c in enumerate(completions)], scorer)
        return [NEUTRAL_SCORE if item["score"] is None else item["score"] for item in items]

    return reward
