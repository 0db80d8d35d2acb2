"""Multi-aspect goals: several feedback columns, each quantized and filtered on its own, one goal per row.

An aspect is one metric (its own column, range, direction, kind and bins). Each aspect gets an
ordinary single-aspect :class:`~gcsl.goals.GoalSetup` (thresholds, retained levels H_a, training
mean) whose templates are *clauses*; :class:`MultiGoalSetup` joins them: natural-language goals state
every aspect's clause in one sentence, reward-token goals put one token per aspect ([A1_R_3+][A2_R_2+]).
The paper names multi-aspect goals as future work; every per-aspect step is the paper's own.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from gcsl.errors import ConfigError
from gcsl.goals.formulate import combination_levels
from gcsl.goals.render import (
    ASPECT_SENTENCE,
    TEMPLATE_FIELDS,
    compose_goal,
    render_goal,
    reward_token,
)
from gcsl.goals.setup import Goal, GoalSetup, inference_goal
from gcsl.goals.spec import MetricKind, MetricSpec

__all__ = ["Aspect", "read_aspects", "MultiGoalSetup", "aspect_inference_goal", "split_goal_request"]

Direction = Literal["higher", "lower", "below"]
_DIRECTIONS = ("higher", "lower", "below")
_KINDS = ("scalar", "ordinal", "categorical")


@dataclass(frozen=True)
class Aspect:
    """One aspect of a multi-aspect goal, as `gcsl prepare --aspect` / the YAML ``aspects:`` list give it.

    ``direction``: ``higher`` is better; ``lower`` is better and flipped (non-toxicity = high + low -
    toxicity, needs a range); ``below``: lower is better, goals read "less than". ``words``: one word per
    level, lowest first, as a single aspect's ``level_words`` (its clause templates state it as {level_word}).
    """

    name: str
    column: str
    low: float | None = None
    high: float | None = None
    direction: Direction = "higher"
    kind: MetricKind = "scalar"
    bins: int = 5  # the paper's K (section 3), as for one aspect
    precision: int = 2
    categories: tuple[str, ...] = ()
    flipped_name: str | None = None
    best_meaning: str | None = None
    templates: dict[str, str] | None = None
    words: tuple[str, ...] = ()

    def spec(self, subject: str) -> MetricSpec:
        return MetricSpec(name=self.name, low=self.low, high=self.high, higher_is_better=self.direction == "higher",
                          flip=self.direction != "below", flipped_name=self.flipped_name, precision=self.precision,
                          kind=self.kind, categories=self.categories, best_meaning=self.best_meaning, subject=subject)


_KEYS = ("name", "column", "range", "direction", "kind", "bins", "precision", "categories", "flipped_name",
         "best_meaning", "templates", "words")
ASPECT_SYNTAX = ("name=NAME,column=COLUMN[,range=LOW:HIGH][,direction=higher|lower|below][,kind=...][,bins=K]"
                 "[,words=LOWEST|...|HIGHEST]")


def _parse_cli(text: str, where: str, problems: list[str]) -> dict[str, Any]:
    """``name=sentiment,column=score,range=0:1`` -> a mapping (categories and words as ``a|b|c``)."""
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            problems.append(f"{where}: {part!r} is not key=value; write {ASPECT_SYNTAX}")
            continue
        key = key.strip().replace("-", "_")
        if key == "range":
            value = value.split(":")
        elif key in ("categories", "words"):
            value = value.split("|")
        values[key] = value
    return values


def read_aspects(items: list[dict | str]) -> tuple[list[Aspect], list[str]]:
    """Aspects from YAML mappings or CLI strings, and every problem found, each naming its aspect and field.

    >>> aspects, problems = read_aspects(["name=sentiment,column=pos,range=0:1", {"name": "brevity"}])
    >>> aspects[0].high, problems
    (1.0, ['aspects[2].column: required; name the feedback column this aspect reads'])
    """
    aspects: list[Aspect] = []
    problems: list[str] = []
    for i, item in enumerate(items, start=1):
        where = f"aspects[{i}]"
        raw = _parse_cli(item, where, problems) if isinstance(item, str) else item
        if not isinstance(raw, dict):
            problems.append(f"{where}: expected a mapping or {ASPECT_SYNTAX}")
            continue
        before = len(problems)
        unknown = sorted(set(raw) - set(_KEYS))
        if unknown:
            problems.append(f"{where}: unknown field(s) {', '.join(unknown)}; valid fields are {', '.join(_KEYS)}")
        for key in ("name", "column"):
            if not str(raw.get(key) or "").strip():
                what = "what goals call this aspect" if key == "name" else "the feedback column this aspect reads"
                problems.append(f"{where}.{key}: required; name {what}")
        low = high = None
        if raw.get("range") is not None:
            try:
                low, high = (float(v) for v in raw["range"])
                if not low < high:
                    raise ValueError
            except (TypeError, ValueError):
                problems.append(f"{where}.range: give LOW:HIGH (YAML: [LOW, HIGH]) with LOW < HIGH, got {raw['range']!r}")
        direction = raw.get("direction", "higher")
        if direction not in _DIRECTIONS:
            problems.append(f"{where}.direction: {direction!r} is not one of {', '.join(_DIRECTIONS)}")
        elif direction == "lower" and raw.get("range") is None:
            problems.append(f"{where}.range: direction=lower flips scores (non-x = high + low - x), which needs "
                            "range=LOW:HIGH; or use direction=below")
        kind = raw.get("kind", "scalar")
        if kind not in _KINDS:
            problems.append(f"{where}.kind: {kind!r} is not one of {', '.join(_KINDS)}")
        categories = tuple(str(c) for c in raw.get("categories") or ())
        if kind == "categorical" and len(categories) < 2:
            problems.append(f"{where}.categories: kind=categorical needs at least two categories, worst to best "
                            "(CLI: categories=bad|ok|good)")
        numbers = {}
        for key, default, least in (("bins", 5, 1), ("precision", 2, 0)):
            try:
                numbers[key] = int(raw.get(key, default))
                if numbers[key] < least:
                    raise ValueError
            except (TypeError, ValueError):
                problems.append(f"{where}.{key}: must be a whole number >= {least}, got {raw.get(key)!r}")
        templates = raw.get("templates")
        if templates is not None and not isinstance(templates, dict):
            problems.append(f"{where}.templates: a mapping of style (bey, snl, range, detail) to a clause template")
        for style, text in (templates or {}).items() if isinstance(templates, dict) else ():
            try:
                str(text).format(**{f: "x" for f in TEMPLATE_FIELDS})
            except (KeyError, IndexError, ValueError) as exc:
                problems.append(f"{where}.templates.{style}: unknown field {exc} (fields: {', '.join(TEMPLATE_FIELDS)})")
        words = raw.get("words") or []
        if not isinstance(words, (list, tuple)) or not all(str(w).strip() for w in words):
            problems.append(f"{where}.words: a list of non-empty words, lowest level first (CLI: words=low|mid|high)")
        elif words and kind != "scalar":
            problems.append(f"{where}.words: {kind} feedback names its levels already; drop words")
        elif words and "bins" in numbers and len(words) != numbers["bins"]:
            # As one aspect's --level-words: one word per bin, so each level has its word.
            problems.append(f"{where}.words: aspect {str(raw.get('name')).strip()!r} has {numbers['bins']} bins, so "
                            f"give {numbers['bins']} words, lowest level first; got {len(words)}")
        if len(problems) == before:
            aspects.append(Aspect(str(raw["name"]).strip(), str(raw["column"]).strip(), low, high, direction, kind,
                                  numbers["bins"], numbers["precision"], categories, raw.get("flipped_name"),
                                  raw.get("best_meaning"), templates, tuple(str(w).strip() for w in words)))
    for key in ("name", "column"):
        seen = [getattr(a, key) for a in aspects]
        for value in sorted({v for v in seen if seen.count(v) > 1}):
            problems.append(f"aspects: {key} {value!r} is given twice; give each aspect its own {key}")
    return aspects, problems


@dataclass(frozen=True)
class MultiGoalSetup:
    """Several aspects' goal setups and how their goals are joined; saved as goals.json like a GoalSetup.

    ``aspects[a]`` is aspect a's own setup (same method), with clause templates. ``trained``: the
    level combinations that have training rows (the count of each in ``combination_counts``).
    """

    method: str
    aspects: tuple[GoalSetup, ...]
    conjunction: str = " and "
    sentence: str = ASPECT_SENTENCE
    placement: str = "after"
    separator: str = "\n\n"
    combination_counts: dict[tuple[int, ...], int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def style(self) -> str | None:
        return self.aspects[0].style

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.metric.name for a in self.aspects)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Levels per aspect (the radix of combination ids)."""
        return tuple(len(a.thresholds) for a in self.aspects)

    @property
    def special_tokens(self) -> list[str]:
        """One token per aspect and level; each aspect's tokens are its own ([A1_R_3+] is not [A2_R_3+])."""
        if not self.aspects[0].special_tokens:
            return []
        beyond = self.style == "token-bey"
        return [reward_token(k, beyond=beyond, aspect=i) for i, a in enumerate(self.aspects, start=1)
                for k in a.levels]

    def _details(self) -> tuple[str, ...]:
        """Each aspect's range sentence, for the styles that state it (bey, range) when its template is there."""
        if self.style not in ("bey", "range"):
            return ()
        return tuple(render_goal(a.metric, "detail", a.templates) for a in self.aspects if "detail" in a.templates)

    def compose(self, parts: list[tuple[int | None, str | None]]) -> str | None:
        """The goal from each aspect's (level, clause): reward tokens side by side, or one sentence."""
        style = self.style
        if style is None:
            return None
        if style in ("token", "token-bey"):
            return "".join(reward_token(level, beyond=style == "token-bey", aspect=i)
                           for i, (level, _) in enumerate(parts, start=1))
        return compose_goal([clause for _, clause in parts], subject=self.aspects[0].metric.subject,
                            conjunction=self.conjunction, details=self._details(), sentence=self.sentence)

    def goal_text(self, combination: int) -> str | None:
        """The training goal of a combination id (see :func:`gcsl.goals.formulate.combination_ids`)."""
        levels = combination_levels(combination, self.sizes)
        return self.compose([(k, a.goal_text(k)) for a, k in zip(self.aspects, levels)])

    # Placing reads only placement and separator, which a multi-aspect setup holds as a single one does.
    place = GoalSetup.place

    def to_json(self) -> dict[str, Any]:
        top = _resolve(self, "top") if self.method else None
        return {
            "method": self.method,
            "aspects": [a.to_json() for a in self.aspects],
            "conjunction": self.conjunction,
            "sentence": self.sentence,
            "placement": self.placement,
            "separator": self.separator,
            "special_tokens": self.special_tokens,
            "combination_counts": [{"levels": list(k), "rows": v} for k, v in sorted(self.combination_counts.items())],
            "inference_goal": None if top is None else {
                "text": top.text, "aspects": [{"name": n, "level": g.level, "threshold": g.threshold}
                                              for n, g in zip(self.names, top.aspects)]},
            **self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MultiGoalSetup:
        known = {"method", "aspects", "conjunction", "sentence", "placement", "separator", "special_tokens",
                 "combination_counts", "inference_goal"}
        return cls(
            method=data["method"],
            aspects=tuple(GoalSetup.from_json(a) for a in data["aspects"]),
            conjunction=data.get("conjunction", " and "),
            sentence=data.get("sentence", ASPECT_SENTENCE),
            placement=data.get("placement", "after"),
            separator=data.get("separator", "\n\n"),
            combination_counts={tuple(c["levels"]): int(c["rows"]) for c in data.get("combination_counts") or ()},
            extra={k: v for k, v in data.items() if k not in known},
        )


def split_goal_request(setup: MultiGoalSetup, request: str) -> list[str]:
    """Each aspect's request from ``top``, ``scale:1.1`` (every aspect) or ``name=req,name=req``.

    Aspects are named by their metric name or their column; an aspect left out is asked for ``top``.

    >>> s = MultiGoalSetup("gcsl-bey-snl", (GoalSetup("gcsl-bey-snl", MetricSpec("sentiment"), (0.5,), (1,), 0.2, 1, {}),
    ...                                     GoalSetup("gcsl-bey-snl", MetricSpec("brevity"), (0.5,), (1,), 0.2, 1, {})))
    >>> split_goal_request(s, "brevity=scale:1.1"), split_goal_request(s, "level:1")
    (['top', 'scale:1.1'], ['level:1', 'level:1'])
    """
    request = str(request).strip()
    if "=" not in request:
        return [request] * len(setup.aspects)
    keys = {}
    for i, a in enumerate(setup.aspects):
        keys[a.metric.name] = keys[a.extra.get("column", a.metric.name)] = i
    wanted = ["top"] * len(setup.aspects)
    given: set[int] = set()
    for part in filter(None, (p.strip() for p in request.split(","))):
        key, eq, value = (s.strip() for s in part.partition("="))
        if not eq or not value:
            raise ConfigError(f"goal {request!r}: write one request per aspect as name=request, e.g. "
                              f"{setup.names[0]}=top,{setup.names[-1]}=scale:1.1")
        if key not in keys:
            raise ConfigError(f"goal {request!r}: no aspect {key!r}; aspects are {', '.join(setup.names)}")
        if keys[key] in given:
            raise ConfigError(f"goal {request!r}: aspect {key!r} is asked for twice; give it once")
        given.add(keys[key])
        wanted[keys[key]] = value
    return wanted


def aspect_inference_goal(setup: MultiGoalSetup, request: str = "top", *, quiet: bool = False) -> Goal:
    """The multi-aspect goal to generate at: each aspect's request resolved as for one aspect
    (:func:`gcsl.goals.inference_goal`: top, a value, scale:F, level:K), then joined.

    A combination of levels that no training row demonstrates (aspects that rarely co-occur at the
    top) is still composed from trained parts, with a note (printed unless ``quiet``), as a snapped
    level is.
    """
    goal = _resolve(setup, request)
    if goal.note and not quiet:
        print(f"gcsl: note: {goal.note}", file=sys.stderr, flush=True)
    return goal


def _resolve(setup: MultiGoalSetup, request: str) -> Goal:
    """:func:`aspect_inference_goal` without printing its note (goals.json states the top goal silently)."""
    request = str(request)
    parts = []
    for a, wanted in zip(setup.aspects, split_goal_request(setup, request)):
        try:
            parts.append(inference_goal(a, wanted))
        except ConfigError as exc:
            raise ConfigError(f"aspect {a.metric.name!r}: {exc}") from None
    if setup.style is None:
        return Goal(None, request=request)
    notes = [f"{a.metric.name}: {g.note}" for a, g in zip(setup.aspects, parts) if g.note]
    levels = tuple(g.level for g in parts)
    if setup.combination_counts and None not in levels and setup.combination_counts.get(levels, 0) == 0:
        note = (f"no training row reaches levels {', '.join(f'{n} {k}' for n, k in zip(setup.names, levels))} "
                "together; the goal combines aspects the model saw only apart")
        notes.append(note)
    text = setup.compose([(g.level, g.text) for g in parts])
    return Goal(text, request=request, note="; ".join(notes) or None, aspects=tuple(parts))
