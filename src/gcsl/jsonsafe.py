"""The one conversion of the package's values to plain JSON, used by every JSON writer.

It sits below every other module (it imports none of them), so configs, run records, stage
files and reports all write numbers, paths and text by the same rules.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

__all__ = ["json_safe", "text_safe"]


def text_safe(text: str) -> str:
    """``text`` itself, or with what UTF-8 cannot encode (lone surrogates) backslash-escaped."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def json_safe(obj: Any) -> Any:
    """``obj`` as plain JSON: config dataclasses as dicts, paths as text, tuples as lists, numpy
    scalars as numbers, NaN and infinities as null, keys as text, unencodable text escaped.

    >>> json_safe({"x": (1.0, float("nan")), 2: Path("a/b")})
    {'x': [1.0, None], '2': 'a/b'}
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: json_safe(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, str):
        return text_safe(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {text_safe(str(k)): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return json_safe(obj.item())
    return obj
