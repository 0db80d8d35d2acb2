"""GoalSetup: everything needed to rebuild a goal at inference, saved as goals.json."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gcsl.errors import ConfigError, StageError
from gcsl.goals.quantize import assign_levels
from gcsl.goals.render import place_goal, render_goal
from gcsl.goals.spec import MetricSpec

if TYPE_CHECKING:
    from gcsl.goals.aspects import MultiGoalSetup

__all__ = ["GoalSetup", "Goal", "inference_goal"]



def _method(name: str):
    """The method table's entry (imported here: :mod:`gcsl.methods` imports this package)."""
    from gcsl.methods import get_method

    return get_method(name)


@dataclass(frozen=True)
class Goal:
    """A goal to generate at: its text (None for goal-free methods), level, threshold, raw value.

    ``note`` says why the goal differs from the request (a value snapped to a trained level).
    """

    text: str | None
    level: int | None = None
    threshold: float | None = None
    value: float | None = None
    request: str = "top"
    note: str | None = None
    # A multi-aspect goal: each aspect's own goal (its text the aspect's clause or token); empty for one aspect.
    aspects: tuple[Goal, ...] = ()


@dataclass(frozen=True)
class GoalSetup:
    """Spec, thresholds (oriented units), retained levels H, training mean, method and templates."""

    method: str
    metric: MetricSpec
    thresholds: tuple[float, ...]
    retained_levels: tuple[int, ...]
    train_mean: float
    bins_requested: int
    templates: dict[str, str]
    placement: str = "after"
    separator: str = "\n\n"
    top_bin_mean: float | None = None
    score_max: float | None = None
    # Words naming the levels, lowest first ({level_word} in templates); empty when not given.
    level_words: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def style(self) -> str | None:
        """How this method writes its goal (:func:`render_goal`'s style); None when it writes none."""
        return _method(self.method).goal_style

    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(range(1, len(self.thresholds) + 1))

    @property
    def trained_levels(self) -> tuple[int, ...]:
        """Levels with a goal in the training data: the retained ones where goal filtering applies, else all."""
        return tuple(sorted(self.retained_levels)) if _method(self.method).filtering else self.levels

    @property
    def special_tokens(self) -> list[str]:
        if _method(self.method).goal_input != "token":
            return []
        return [render_goal(self.metric, self.style, self.templates, level=k) for k in self.levels]

    def threshold_display(self, level: int) -> float:
        return self.metric.display(self.thresholds[level - 1])

    def _bin_bounds(self, level: int) -> tuple[float, float]:
        """A bin's bounds in display units; the top bin ends at the range's best end (or the best score)."""
        lower = self.threshold_display(level)
        if level < len(self.thresholds):
            return lower, self.threshold_display(level + 1)
        best = self.metric.display_range[0 if self.metric.below else 1]
        return lower, best if best is not None else self.metric.display(self.score_max)

    def level_word(self, level: int | None) -> str | None:
        """The word naming level k (levels below 1 take the lowest word); None without level words."""
        if not self.level_words or level is None:
            return None
        return self.level_words[min(max(level, 1), len(self.level_words)) - 1]

    def level_of(self, value: float) -> int:
        """The level a display-unit value reaches (0 below every threshold)."""
        oriented = -value if self.metric.below else value
        return int(assign_levels(np.array([oriented]), self.thresholds)[0])

    def goal_text(self, level: int) -> str | None:
        """The training/inference goal text for level k under this setup's method."""
        style = self.style
        if style is None or style == "value":
            return None
        word = self.level_word(level)
        if style == "range" and self.metric.kind == "scalar":
            return render_goal(self.metric, style, self.templates, range_bounds=self._bin_bounds(level), level=level,
                               level_word=word)
        return render_goal(self.metric, style, self.templates, threshold=self.threshold_display(level), level=level,
                           level_word=word)

    def value_text(self, value: float) -> str | None:
        """The no-quantization NL goal for a raw (display-unit) score."""
        if self.style != "value":
            return None
        return render_goal(self.metric, "value", self.templates, value=value,
                           level_word=self.level_word(self.level_of(value)))

    def place(self, prompt: str | list[dict[str, str]], goal_text: str | None):
        return place_goal(prompt, goal_text, self.placement, self.separator)  # type: ignore[arg-type]

    # -- persistence -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        top = inference_goal(self, "top") if self.method else None
        return {
            "method": self.method,
            "metric": self.metric.to_json(),
            "thresholds": [self.threshold_display(k) for k in self.levels],
            "levels": list(self.levels),
            "retained_levels": list(self.retained_levels),
            "train_mean": self.metric.display(self.train_mean),
            "bins_requested": self.bins_requested,
            "bins_used": len(self.thresholds),
            "precision": self.metric.precision,
            "templates": self.templates,
            "template": self.templates.get(self.style) if self.style in self.templates else self.style,
            "placement": self.placement,
            "separator": self.separator,
            "special_tokens": self.special_tokens,
            "top_bin_mean": None if self.top_bin_mean is None else self.metric.display(self.top_bin_mean),
            "score_max": None if self.score_max is None else self.metric.display(self.score_max),
            **({"level_words": list(self.level_words)} if self.level_words else {}),
            "inference_goal": None if top is None else {
                "text": top.text, "level": top.level, "threshold": top.threshold, "value": top.value},
            **self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GoalSetup:
        metric = MetricSpec.from_json(data["metric"])

        def orient(v: float | None) -> float | None:
            return None if v is None else (-v if metric.below else v)

        known = {"method", "metric", "thresholds", "levels", "retained_levels", "train_mean", "bins_requested",
                 "bins_used", "precision", "templates", "template", "placement", "separator", "special_tokens",
                 "top_bin_mean", "score_max", "inference_goal", "level_words"}
        return cls(
            method=data["method"],
            metric=metric,
            thresholds=tuple(orient(t) for t in data["thresholds"]),
            retained_levels=tuple(data["retained_levels"]),
            train_mean=orient(data["train_mean"]),
            bins_requested=data["bins_requested"],
            templates=dict(data["templates"]),
            placement=data.get("placement", "after"),
            separator=data.get("separator", "\n\n"),
            top_bin_mean=orient(data.get("top_bin_mean")),
            score_max=orient(data.get("score_max")),
            level_words=tuple(data.get("level_words") or ()),
            extra={k: v for k, v in data.items() if k not in known},
        )

    @classmethod
    def load(cls, path: str | Path) -> GoalSetup | MultiGoalSetup:
        """Reads goals.json (a file, or a directory that holds one); a multi-aspect one as a MultiGoalSetup."""
        path = Path(path)
        if path.is_dir():
            path = path / "goals.json"
        if not path.is_file():
            raise StageError(f"{path}: goals.json not found; point at a `gcsl prepare` or `gcsl train` output directory")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if "aspects" in data:  # several feedback aspects (gcsl.goals.aspects)
                from gcsl.goals.aspects import MultiGoalSetup

                return MultiGoalSetup.from_json(data)
            return cls.from_json(data)
        except (KeyError, ValueError, TypeError) as exc:
            raise StageError(f"{path}: not a valid goals file ({exc}); re-run `gcsl prepare`") from None


def inference_goal(setup: GoalSetup | MultiGoalSetup, request: str | float = "top") -> Goal:
    """The goal to generate at: ``"top"``, a value, ``"scale:F"`` or ``"level:K"``.

    A multi-aspect setup takes one of these per aspect (``sentiment=top,brevity=scale:1.1``; see
    :func:`gcsl.goals.aspects.aspect_inference_goal`).

    - ``top``: the highest retained threshold (no-quantization methods: the top bin's mean score).
    - a value in the metric's units, rounded to the spec's precision and clipped to its range.
    - ``scale:F``: the ``top`` goal made more ambitious by F. A positive base is multiplied by F
      (divided by F for a lower-is-better metric phrased as "below"), as in the paper; a base at
      or below 0 would move the wrong way, so there the distance from the metric's worst end is
      scaled instead, which needs the metric's range.
    - ``level:K``: level K's goal exactly as it was trained (beyond methods: retained levels only).

    Level-only goals (reward tokens, classic GCSL-NL bins) cannot state a value, so a value maps
    to the highest level whose threshold it reaches. When that level was never trained (filtered
    out of a beyond method, or below every threshold) the nearest trained level is used instead,
    with a one-line note on stderr (also kept in ``Goal.note``): the model has no goal for it.

    >>> from gcsl.goals.render import default_templates
    >>> spec = MetricSpec(name="quality", low=0, high=1)
    >>> s = GoalSetup("gcsl-bey-snl", spec, (0.2, 0.5, 0.8), (2, 3), 0.45, 3, default_templates(spec))
    >>> inference_goal(s, "scale:1.1").text
    'Generate a response with a quality score greater than 0.88.'
    >>> inference_goal(s, "level:2").text
    'Generate a response with a quality score greater than 0.50.'
    >>> t = GoalSetup("gcsl-bey", spec, (0.2, 0.5, 0.8), (2, 3), 0.45, 3, default_templates(spec))
    >>> goal = inference_goal(t, "0.3")  # level 1 was filtered out, so [R_1+] was never trained
    >>> goal.text, goal.note
    ('[R_2+]', "goal '0.3' reaches only level 1 (0.20), which was not trained; using level 2 (0.50) instead")
    """
    if hasattr(setup, "aspects"):  # a MultiGoalSetup: each aspect resolved as below, then joined
        from gcsl.goals.aspects import aspect_inference_goal

        return aspect_inference_goal(setup, request)
    request_text = str(request)
    method = _method(setup.method)
    style = method.goal_style
    metric = setup.metric
    top_level = max(setup.retained_levels)
    scalar_goal = method.goal_request == "value"
    if not method.is_goal_conditioned:
        return Goal(None, request=request_text)
    if request_text == "top":
        if scalar_goal:
            value = metric.round(_top_value(setup))
            return Goal(setup.value_text(value), value=value, request=request_text)
        return Goal(setup.goal_text(top_level), top_level, setup.threshold_display(top_level), request=request_text)
    if request_text.startswith("level:"):
        return _level_goal(setup, request_text)
    if request_text.startswith("scale:"):
        try:
            factor = float(request_text.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"goal {request_text!r}: the scale factor must be a number, e.g. scale:1.08") from None
        if not factor > 0:
            raise ConfigError(f"goal {request_text!r}: the scale factor must be positive, e.g. scale:1.08")
        # The same base as ``top``: a no-quantization model is asked for the top bin's mean, so
        # its scaled goals must start there too, not at the top threshold.
        value = _scale(setup, _top_value(setup) if scalar_goal else setup.threshold_display(top_level), factor,
                       request_text)
    else:
        try:
            value = float(request_text)
        except ValueError:
            raise ConfigError(f"goal {request_text!r}: use top, a number, scale:<factor> or level:<k>") from None
    value = metric.clip_display(metric.round(value))
    if scalar_goal:
        return Goal(setup.value_text(value), value=value, request=request_text)
    oriented = -value if metric.below else value
    level = setup.level_of(value)
    if method.goal_request == "level":
        trained = setup.trained_levels
        note = None
        if level not in trained:
            # Nearest trained threshold, ties to the more ambitious level: with filtering the
            # trained levels are the top ones, so this is the lowest trained level.
            chosen = min(trained, key=lambda k: (abs(setup.thresholds[k - 1] - oriented), -k))
            fmt = metric.format_value
            reached = (f"only level {level} ({fmt(setup.threshold_display(level))}), which was not trained"
                       if level >= 1 else
                       f"no level (the lowest threshold is {fmt(setup.threshold_display(1))})")
            note = (f"goal {request_text!r} reaches {reached}; using level {chosen} "
                    f"({fmt(setup.threshold_display(chosen))}) instead")
            print(f"gcsl: note: {note}", file=sys.stderr, flush=True)
            level = chosen
        return Goal(setup.goal_text(level), level, setup.threshold_display(level), request=request_text, note=note)
    text = render_goal(metric, style, setup.templates, threshold=value, level_word=setup.level_word(level))
    return Goal(text, level if level >= 1 else None, value, request=request_text)


def _top_value(setup: GoalSetup) -> float:
    """The no-quantization ``top`` goal in display units: the top bin's mean, else the top threshold."""
    if setup.top_bin_mean is not None:
        return setup.metric.display(setup.top_bin_mean)
    return setup.threshold_display(max(setup.retained_levels))


def _scale(setup: GoalSetup, base: float, factor: float, request: str) -> float:
    """``base`` made more ambitious by ``factor``: always toward the metric's best end.

    >>> from gcsl.goals.render import default_templates
    >>> spec = MetricSpec(name="margin", low=-1, high=1)
    >>> s = GoalSetup("gcsl-bey-nl", spec, (-0.6, -0.4, -0.2), (2, 3), -0.45, 3, default_templates(spec))
    >>> round(_scale(s, -0.2, 1.1, "scale:1.1"), 4)  # the distance from -1 grows from 0.8 to 0.88
    -0.12
    """
    metric = setup.metric
    if base > 0:
        return base / factor if metric.below else base * factor
    low, high = metric.display_range
    worst = high if metric.below else low
    if worst is None:
        raise ConfigError(f"goal {request!r}: the top goal {metric.format_value(base)} is not positive, so scaling "
                          "it needs the metric's range; re-run `gcsl prepare` with --range LOW HIGH or give a value")
    return worst - (worst - base) * factor if metric.below else worst + (base - worst) * factor


def _level_goal(setup: GoalSetup, request: str) -> Goal:
    """``level:K``: level K's training goal (no-quantization methods: its threshold as the value)."""
    try:
        level = int(request.split(":", 1)[1])
    except ValueError:
        raise ConfigError(f"goal {request!r}: the level must be an integer, e.g. level:{max(setup.levels)}") from None
    if level not in setup.levels:
        raise ConfigError(f"goal {request!r}: this setup has levels 1..{len(setup.levels)}; use level:<k> with k "
                          "in that range")
    trained = setup.trained_levels
    if level not in trained:
        raise ConfigError(f"goal {request!r}: level {level} was filtered out and never trained; trained levels are "
                          f"{', '.join(map(str, trained))}")
    threshold = setup.threshold_display(level)
    if _method(setup.method).goal_request == "value":
        value = setup.metric.round(threshold)
        return Goal(setup.value_text(value), level, threshold, value, request=request)
    return Goal(setup.goal_text(level), level, threshold, request=request)
