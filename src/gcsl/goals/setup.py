"""GoalSetup: everything needed to rebuild a goal at inference, saved as goals.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gcsl.errors import ConfigError, StageError
from gcsl.goals.quantize import assign_levels
from gcsl.goals.render import GOAL_STYLE, place_goal, render_goal
from gcsl.goals.spec import MetricSpec

__all__ = ["GoalSetup", "Goal", "inference_goal"]


@dataclass(frozen=True)
class Goal:
    """A goal to generate at: its text (None for goal-free methods), level, threshold, raw value."""

    text: str | None
    level: int | None = None
    threshold: float | None = None
    value: float | None = None
    request: str = "top"


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
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def style(self) -> str | None:
        return GOAL_STYLE[self.method]

    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(range(1, len(self.thresholds) + 1))

    @property
    def special_tokens(self) -> list[str]:
        if self.style not in ("token", "token-bey"):
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

    def goal_text(self, level: int) -> str | None:
        """The training/inference goal text for level k under this setup's method."""
        style = self.style
        if style is None or style == "value":
            return None
        if style == "range" and self.metric.kind == "scalar":
            return render_goal(self.metric, style, self.templates, range_bounds=self._bin_bounds(level), level=level)
        return render_goal(self.metric, style, self.templates, threshold=self.threshold_display(level), level=level)

    def value_text(self, value: float) -> str | None:
        """The no-quantization NL goal for a raw (display-unit) score."""
        return render_goal(self.metric, "value", self.templates, value=value) if self.style == "value" else None

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
                 "top_bin_mean", "score_max", "inference_goal"}
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
            extra={k: v for k, v in data.items() if k not in known},
        )

    @classmethod
    def load(cls, path: str | Path) -> GoalSetup:
        """Reads goals.json (a file, or a directory that holds one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "goals.json"
        if not path.is_file():
            raise StageError(f"{path}: goals.json not found; point at a `gcsl prepare` or `gcsl train` output directory")
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (KeyError, ValueError, TypeError) as exc:
            raise StageError(f"{path}: not a valid goals file ({exc}); re-run `gcsl prepare`") from None


def inference_goal(setup: GoalSetup, request: str | float = "top") -> Goal:
    """The goal to generate at: ``"top"`` (highest retained threshold), a value, or ``"scale:F"``.

    A value or a scaled top threshold is rounded to the spec's precision and clipped to its
    range. Scaling means "more ambitious by F": the threshold is multiplied by F, or divided by
    F for a lower-is-better metric phrased as "below". Token methods can only take levels, so a
    value maps to the highest level whose threshold it reaches.

    >>> from gcsl.goals.render import default_templates
    >>> spec = MetricSpec(name="quality", low=0, high=1)
    >>> s = GoalSetup("gcsl-bey-snl", spec, (0.2, 0.5, 0.8), (2, 3), 0.45, 3, default_templates(spec))
    >>> inference_goal(s, "scale:1.1").text
    'Generate a response with a quality score greater than 0.88.'
    """
    request_text = str(request)
    style = setup.style
    metric = setup.metric
    top_level = max(setup.retained_levels)
    if style is None and setup.method != "gcsl-noquant-embed":
        return Goal(None, request=request_text)
    if request_text == "top":
        if style == "value" or setup.method == "gcsl-noquant-embed":
            value = metric.round(metric.display(setup.top_bin_mean if setup.top_bin_mean is not None
                                                else setup.thresholds[top_level - 1]))
            return Goal(setup.value_text(value), value=value, request=request_text)
        return Goal(setup.goal_text(top_level), top_level, setup.threshold_display(top_level), request=request_text)
    if request_text.startswith("scale:"):
        try:
            factor = float(request_text.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"goal {request_text!r}: the scale factor must be a number, e.g. scale:1.08") from None
        base = (metric.display(setup.top_bin_mean) if style == "value" and setup.top_bin_mean is not None
                else setup.threshold_display(top_level))
        value = base / factor if metric.below else base * factor
    else:
        try:
            value = float(request_text)
        except ValueError:
            raise ConfigError(f"goal {request_text!r}: use top, a number, or scale:<factor>") from None
    value = metric.clip_display(metric.round(value))
    if style == "value" or setup.method == "gcsl-noquant-embed":
        return Goal(setup.value_text(value), value=value, request=request_text)
    oriented = -value if metric.below else value
    level = int(assign_levels(np.array([oriented]), setup.thresholds)[0])
    if style in ("token", "token-bey", "range"):
        if level < 1:
            raise ConfigError(f"goal {request_text!r} is below every threshold; the lowest is "
                              f"{metric.format_value(setup.threshold_display(1))}")
        return Goal(setup.goal_text(level), level, setup.threshold_display(level), request=request_text)
    text = render_goal(metric, style, setup.templates, threshold=value)
    return Goal(text, level if level >= 1 else None, value, request=request_text)
