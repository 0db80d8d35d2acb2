"""The files that pass between stages, each read and written in one place.

- JSONL (generations, prompt files, per-item scores): :func:`iter_jsonl` is the only reader,
  :func:`write_jsonl` the only writer (atomic; NaN and infinities become null; text that UTF-8
  cannot encode is backslash-escaped, never a crash);
- :func:`json_safe`: the one JSON-safe conversion, used by every JSON writer of the package;
- :func:`read_generations`: a ``gcsl generate`` output, checked line by line;
- :class:`ModelFolder`: a ``gcsl train`` output, finished or not, with its goals and the
  checkpoint an interrupted run resumes from.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gcsl.errors import DataError
from gcsl.jsonsafe import json_safe, text_safe
from gcsl.runinfo import atomic_path

if TYPE_CHECKING:
    from gcsl.goals import GoalSetup

__all__ = ["iter_jsonl", "write_jsonl", "json_line", "json_safe", "text_safe", "read_generations", "ModelFolder"]


def iter_jsonl(path: Path, what: str = "JSONL") -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields ``(line_number, object)`` for each non-blank line; a bad line is a one-line DataError.

    >>> next(iter_jsonl(Path("gens.jsonl")))  # doctest: +SKIP
    (1, {'prompt_id': 'p1', ...})
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found; check the path")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte "
                                f"{exc.start + 1} of the line); a {what} file must be UTF-8 encoded JSON lines"
                                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                f"each line of a {what} file must be one JSON object") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}; "
                                f"each line of a {what} file must be one JSON object")
            yield lineno, obj


def read_generations(path: Path) -> list[dict[str, Any]]:
    """Generation rows of a ``gcsl generate`` output, each with ``prompt_id`` and ``completion``.

    A ``completion`` that is not text is kept: it is the model's output and the task scores it
    as unscorable. A missing field or an empty file is the file's fault and stops here.

    >>> rows = read_generations(Path("gens.jsonl"))  # doctest: +SKIP
    """
    rows = []
    for lineno, obj in iter_jsonl(path, "generations"):
        for key in ("prompt_id", "completion"):
            if key not in obj:
                raise DataError(f"{path}:{lineno}: missing field '{key}'; generation rows need prompt_id, prompt, "
                                "completion (see `gcsl generate`)")
        if not isinstance(obj["prompt_id"], (str, int)) or isinstance(obj["prompt_id"], bool):
            raise DataError(f"{path}:{lineno}: field 'prompt_id' must be a string, got {obj['prompt_id']!r}")
        rows.append(obj)
    if not rows:
        raise DataError(f"{path}: no generations in the file; run `gcsl generate` first")
    return rows


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Writes one JSON object per line, atomically (NaN and infinities become null).

    >>> write_jsonl(Path("prompts.jsonl"), [{"id": "p1", "prompt": "Hello"}])  # doctest: +SKIP
    """
    with atomic_path(Path(path)) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json_line(row))


def json_line(row: Any) -> str:
    return json.dumps(json_safe(row), ensure_ascii=False, allow_nan=False) + "\n"


@dataclass(frozen=True)
class ModelFolder:
    """A ``gcsl train`` output ``path``: finished once it exists with its run record; until then
    the run lives in ``<path>.partial`` with its checkpoints.

    >>> ModelFolder(Path("runs/a")).partial
    PosixPath('runs/a.partial')
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def partial(self) -> Path:
        return self.path.with_name(self.path.name + ".partial")

    @property
    def state(self) -> Literal["complete", "partial", "absent"]:
        """``complete`` (finished: renamed into place with run.json), ``partial`` (an unfinished
        run is in ``.partial``) or ``absent``."""
        if (self.path / "run.json").is_file():
            return "complete"
        return "partial" if self.partial.exists() else "absent"

    @property
    def last_checkpoint(self) -> Path | None:
        """The newest ``checkpoint-<step>`` of an unfinished run whose trainer_state.json (written
        last) is whole; None when there is none to resume from."""
        checkpoints = self.partial / "checkpoints"
        if not checkpoints.is_dir():
            return None
        found = []
        for child in checkpoints.iterdir():
            match = re.fullmatch(r"checkpoint-(\d+)", child.name)
            state = child / "trainer_state.json"
            if match and state.is_file():
                try:
                    json.loads(state.read_text(encoding="utf-8"))
                except ValueError:  # killed while writing it
                    continue
                found.append((int(match.group(1)), child))
        return max(found)[1] if found else None

    def goal_setup(self) -> GoalSetup | None:
        """The goals the model was trained with (goals.json), or None for a goal-free model or a
        model that is not a gcsl folder (a base model's name or path)."""
        from gcsl.goals import GoalSetup

        if not (self.path / "goals.json").is_file():
            return None
        return GoalSetup.load(self.path)
