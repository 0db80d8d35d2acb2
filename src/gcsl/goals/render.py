"""Goal text: reward tokens and natural-language templates, and where the goal sits in a prompt."""

from __future__ import annotations

from typing import Any, Literal

from gcsl.goals.spec import MetricSpec

__all__ = [
    "Placement",
    "default_templates",
    "default_aspect_templates",
    "compose_goal",
    "render_goal",
    "reward_token",
    "place_goal",
    "training_row",
    "TEMPLATE_FIELDS",
]


def __getattr__(name: str) -> Any:
    """``GOAL_STYLE`` (method -> goal style) and ``METHODS`` (trainable names), read from :mod:`gcsl.methods`.

    Kept for importers from before the method table; computed on access because the table
    imports this package (a module-level copy would be a circular import and could go stale).
    """
    if name in ("GOAL_STYLE", "METHODS"):
        from gcsl.methods import METHODS, trained_methods

        names = trained_methods()
        return {m: METHODS[m].goal_style for m in names} if name == "GOAL_STYLE" else names
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


Placement = Literal["after", "before", "system"]

TEMPLATE_FIELDS = ("subject", "a_metric", "metric", "Metric", "Metrics", "cmp", "threshold", "range_low", "range_high",
                   "value", "low", "high", "best_value", "best_meaning", "categories", "level_word")

# Defaults follow the wording of the paper's examples (its appendix C.6): the target, then the
# metric's range and which end is best. "range" is classic GCSL-NL (a bin), "bey" GCSL-bey-NL,
# "snl" the simplified wording (metric name and target only), "value" the no-quantization goal.
_SCALAR = {
    "bey": "Generate {subject} with {a_metric} {cmp} {threshold}. {Metrics} range from {low} "
           "to {high}, with {best_value} indicating {best_meaning}.",
    "snl": "Generate {subject} with {a_metric} {cmp} {threshold}.",
    "range": "Generate {subject} with {a_metric} between {range_low} and {range_high}. {Metrics} "
             "range from {low} to {high}, with {best_value} indicating {best_meaning}.",
    "value": "Generate {subject} with {a_metric} of {value}. {Metrics} range from {low} to {high}, "
             "with {best_value} indicating {best_meaning}.",
}
_ORDINAL = {
    "bey": "Generate {subject} with {a_metric} {cmp} {threshold}. {Metrics} range from {low} to {high}, "
           "with {best_value} indicating {best_meaning}.",
    "snl": "Generate {subject} with {a_metric} {cmp} {threshold}.",
    "range": "Generate {subject} with {a_metric} of {threshold}. {Metrics} range from {low} to {high}, "
             "with {best_value} indicating {best_meaning}.",
    "value": "Generate {subject} with {a_metric} of {value}. {Metrics} range from {low} to {high}, "
             "with {best_value} indicating {best_meaning}.",
}
_CATEGORICAL = {
    "bey": "Generate {subject} rated {threshold} or better. Ratings from worst to best: {categories}.",
    "snl": "Generate {subject} rated {threshold} or better.",
    "range": "Generate {subject} rated {threshold}. Ratings from worst to best: {categories}.",
    "value": "Generate {subject} rated {value}. Ratings from worst to best: {categories}.",
}


def default_templates(spec: MetricSpec) -> dict[str, str]:
    """The built-in NL templates for a metric kind (users override any of them in config)."""
    return dict({"scalar": _SCALAR, "ordinal": _ORDINAL, "categorical": _CATEGORICAL}[spec.kind])


# Multi-aspect goals (the paper's future work, so no wording of its own): each aspect states one
# clause, worded as the single-aspect defaults above word their target, and the clauses share one
# sentence. "detail" is the range sentence, stated once per aspect after the goal (bey and range
# styles, as above; the simplified style leaves it out).
_ASPECT_SCALAR = {"bey": "{a_metric} {cmp} {threshold}", "snl": "{a_metric} {cmp} {threshold}",
                  "range": "{a_metric} between {range_low} and {range_high}",
                  "detail": "{Metrics} range from {low} to {high}, with {best_value} indicating {best_meaning}."}
_ASPECT_ORDINAL = {**_ASPECT_SCALAR, "range": "{a_metric} of {threshold}"}
_ASPECT_CATEGORICAL = {"bey": "a {metric} of {threshold} or better", "snl": "a {metric} of {threshold} or better",
                       "range": "a {metric} of {threshold}",
                       "detail": "{Metric} ratings from worst to best: {categories}."}
# The sentence the clauses share; {goals} is the clauses joined by the conjunction.
ASPECT_SENTENCE = "Generate {subject} with {goals}.{details}"


def default_aspect_templates(spec: MetricSpec) -> dict[str, str]:
    """One aspect's built-in clause templates by style, plus its ``detail`` sentence (multi-aspect goals)."""
    return dict({"scalar": _ASPECT_SCALAR, "ordinal": _ASPECT_ORDINAL, "categorical": _ASPECT_CATEGORICAL}[spec.kind])


def compose_goal(clauses: list[str], *, subject: str, conjunction: str = " and ", details: tuple[str, ...] = (),
                 sentence: str = ASPECT_SENTENCE) -> str:
    """One sentence stating every aspect's clause, then each aspect's detail sentence.

    >>> compose_goal(["a sentiment score greater than 0.57", "a brevity score greater than 0.40"],
    ...              subject="a review")
    'Generate a review with a sentiment score greater than 0.57 and a brevity score greater than 0.40.'
    """
    return sentence.format(subject=subject, goals=conjunction.join(clauses),
                           details="".join(" " + d for d in details))


def reward_token(level: int, *, beyond: bool, aspect: int | None = None) -> str:
    """Classic GCSL's [R_k] (score in bin k) or GCSL-bey's [R_k+] (score at least tau_k).

    A multi-aspect goal has one token per aspect, numbered from 1: [A2_R_3+] is aspect 2 at level 3.

    >>> reward_token(3, beyond=True), reward_token(3, beyond=False, aspect=2)
    ('[R_3+]', '[A2_R_3]')
    """
    prefix = f"A{aspect}_" if aspect is not None else ""
    return f"[{prefix}R_{level}+]" if beyond else f"[{prefix}R_{level}]"


# Words spelled with a leading vowel letter but said with a consonant sound ("a user", "a one-star").
_CONSONANT_SOUND = ("eu", "one", "once", "ubi", "uni", "usa", "use", "usu", "uti")


def _article(word: str) -> str:
    """``a`` or ``an`` for ``word``, by its (English) sound where the spelling misleads.

    >>> [_article(w) for w in ("toxicity", "efficiency", "user rating", "unique score", "upvote", "ultimate")]
    ['a', 'an', 'a', 'a', 'an', 'an']
    """
    low = word.lower()
    if low.startswith(_CONSONANT_SOUND):
        return "a"
    return "an" if low[:1] in "aeiou" else "a"


def _endpoint(spec: MetricSpec, value: float | None) -> str:
    """Range ends read as people write them: "from 0 to 1", not "from 0.00 to 1.00"."""
    if value is None:
        return ""
    if spec.kind != "scalar":
        return spec.format_value(value)
    return f"{value:g}"


def render_goal(spec: MetricSpec, style: str, templates: dict[str, str], *, threshold: float | None = None,
                range_bounds: tuple[float, float] | None = None, value: float | None = None,
                level: int | None = None, level_word: str | None = None) -> str | None:
    """Writes one goal. Numbers are display units, formatted with the spec's precision.

    >>> spec = MetricSpec(name="toxicity", low=0, high=1, higher_is_better=False, best_meaning="the least toxicity")
    >>> render_goal(spec, "snl", default_templates(spec), threshold=0.85)
    'Generate a response with a non-toxicity score greater than 0.85.'
    """
    if style is None:
        return None
    if style in ("token", "token-bey"):
        if level is None:
            raise ValueError("token goals need a level")
        return reward_token(level, beyond=style == "token-bey")
    name = spec.display_name
    # "a non-toxicity score" / "a rating": scalar metrics are scores unless the name says so.
    phrase = name if spec.kind != "scalar" or name.lower().endswith("score") else f"{name} score"
    low, high = spec.display_range
    best = low if spec.below else high
    cmp_word = ("less than" if spec.below else "greater than") if spec.kind == "scalar" else \
        ("equal or less than" if spec.below else "equal or greater than")
    fmt = spec.format_value
    fields: dict[str, Any] = {
        "subject": spec.subject,
        "a_metric": f"{_article(phrase)} {phrase}",
        "metric": name,
        "Metric": name[:1].upper() + name[1:],
        "Metrics": phrase[:1].upper() + phrase[1:] + "s",
        "cmp": cmp_word,
        "threshold": fmt(threshold) if threshold is not None else "",
        "range_low": fmt(min(range_bounds)) if range_bounds else "",
        "range_high": fmt(max(range_bounds)) if range_bounds else "",
        # The no-quantization goal states the raw score at two decimals whatever the precision.
        "value": (spec.format_value(value) if spec.kind != "scalar" else f"{value:.2f}") if value is not None else "",
        "low": _endpoint(spec, low),
        "high": _endpoint(spec, high),
        "best_value": _endpoint(spec, best),
        "best_meaning": spec.best_meaning or (f"the lowest {spec.name}" if spec.below else f"the highest {name}"),
        "categories": ", ".join(spec.categories),
        # A word for the goal's level ("very negative"), for templates that state it beside the number.
        "level_word": level_word or "",
    }
    return templates[style].format(**fields)


def place_goal(prompt: str | list[dict[str, str]], goal: str | None, placement: Placement = "after",
               separator: str = "\n\n") -> str | list[dict[str, str]]:
    """Puts the goal into a prompt: after it (default), before it, or as a system message.

    Chat prompts get the goal in their last user message (after/before) or in the system
    message. Placing it after the prompt keeps the prompt a shared prefix of all its goal
    variants, which the trainer exploits to compute the prompt once. A prompt that the response
    continues (a text beginning) needs the goal before it, so that the text ends the prompt.

    >>> place_goal("Write a review.", "Be kind.")
    'Write a review.\\n\\nBe kind.'
    >>> place_goal("Hi", "Be kind.", "system")
    [{'role': 'system', 'content': 'Be kind.'}, {'role': 'user', 'content': 'Hi'}]
    """
    if goal is None:
        return prompt
    if isinstance(prompt, str):
        if placement == "after":
            return prompt + separator + goal
        if placement == "before":
            return goal + separator + prompt
        return [{"role": "system", "content": goal}, {"role": "user", "content": prompt}]
    messages = [dict(m) for m in prompt]
    if placement == "system":
        if messages and messages[0].get("role") == "system":
            messages[0]["content"] = goal + separator + messages[0]["content"]
        else:
            messages.insert(0, {"role": "system", "content": goal})
        return messages
    user_idx = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if user_idx is None:
        messages.append({"role": "user", "content": goal})
        return messages
    content = messages[user_idx]["content"]
    messages[user_idx]["content"] = content + separator + goal if placement == "after" else goal + separator + content
    return messages


def training_row(prompt: str | list[dict[str, str]], goal: str | None, response: str, placement: Placement = "after",
                 separator: str = "\n\n", *, chat: bool) -> tuple[Any, Any]:
    """(prompt with the goal in place, completion) in the form training reads them.

    Text prompts stay text with the response as the completion; in a chat log (``chat``), or once
    a system goal turns a text prompt into messages, the prompt is messages (text becomes one user
    message) and the completion one assistant message.

    >>> training_row("Hi", "Be kind.", "Hello!", chat=False)
    ('Hi\\n\\nBe kind.', 'Hello!')
    >>> training_row("Hi", None, "Hello!", chat=True)
    ([{'role': 'user', 'content': 'Hi'}], [{'role': 'assistant', 'content': 'Hello!'}])
    """
    placed = place_goal(prompt, goal, placement, separator)
    if isinstance(placed, str) and not chat:
        return placed, response
    messages = ([{"role": "user", "content": placed}] if isinstance(placed, str) else
                [{"role": m["role"], "content": m["content"]} for m in placed])
    return messages, [{"role": "assistant", "content": response}]
