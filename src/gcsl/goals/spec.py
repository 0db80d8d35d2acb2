"""The metric spec: what a feedback value means, and how goals speak about it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["MetricSpec", "MetricKind"]

MetricKind = Literal["scalar", "ordinal", "categorical"]


@dataclass(frozen=True)
class MetricSpec:
    """Name, range, direction, precision and kind of a feedback metric.

    Internally gcsl works with *oriented* scores, where larger is always better: a
    lower-is-better metric is either flipped (``flip=True``: non-toxicity = high + low - toxicity,
    with its own display name) or kept as is and phrased as "below" (``flip=False``: oriented
    score = -score). ``display`` converts an oriented value back to the units goals are written in.

    >>> MetricSpec(name="toxicity", low=0.0, high=1.0, higher_is_better=False).display_name
    'non-toxicity'
    """

    name: str = "score"
    low: float | None = None
    high: float | None = None
    higher_is_better: bool = True
    flip: bool = True
    flipped_name: str | None = None
    precision: int = 2
    kind: MetricKind = "scalar"
    categories: tuple[str, ...] = ()
    best_meaning: str | None = None
    subject: str = "a response"

    @property
    def flipped(self) -> bool:
        return not self.higher_is_better and self.flip

    @property
    def below(self) -> bool:
        """Goals read "below t": a lower-is-better metric that is not flipped."""
        return not self.higher_is_better and not self.flip

    @property
    def display_name(self) -> str:
        if self.flipped:
            return self.flipped_name or f"non-{self.name}"
        return self.name

    @property
    def display_range(self) -> tuple[float | None, float | None]:
        if self.kind == "categorical":
            return 1.0, float(len(self.categories))
        return self.low, self.high

    def orient(self, scores: np.ndarray) -> np.ndarray:
        """Raw feedback -> oriented scores (larger is better), in display units where possible."""
        scores = np.asarray(scores, dtype=np.float64)
        if self.higher_is_better:
            return scores
        if self.flip:
            return (self.low + self.high) - scores
        return -scores

    def display(self, oriented: float) -> float:
        """Oriented score -> the number a goal is written with."""
        return -oriented if self.below else oriented

    def clip_display(self, value: float) -> float:
        low, high = self.display_range
        if low is not None:
            value = max(value, low)
        if high is not None:
            value = min(value, high)
        return value

    def format_value(self, value: float) -> str:
        """A value as goals print it: the category name, an integer rating, or fixed precision."""
        if self.kind == "categorical":
            return self.categories[int(round(value)) - 1]
        if self.kind == "ordinal":
            return str(int(round(value)))
        return f"{value:.{self.precision}f}"

    def round(self, value: float) -> float:
        if self.kind != "scalar":
            return float(round(value))
        return float(round(value, self.precision))

    def to_json(self) -> dict:
        return {
            "name": self.name, "low": self.low, "high": self.high,
            "higher_is_better": self.higher_is_better, "flip": self.flip,
            "flipped_name": self.flipped_name, "display_name": self.display_name,
            "precision": self.precision, "kind": self.kind, "categories": list(self.categories),
            "best_meaning": self.best_meaning, "subject": self.subject,
        }

    @classmethod
    def from_json(cls, data: dict) -> MetricSpec:
        keys = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in keys}
        values["categories"] = tuple(values.get("categories") or ())
        return cls(**values)


