"""Atomic writes and the run record every workflow leaves beside its outputs."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from gcsl.config import config_to_dict
from gcsl.jsonsafe import json_safe

__all__ = ["atomic_write_text", "atomic_write_json", "atomic_path", "atomic_dir", "package_versions",
           "write_run_record"]

_TRACKED = ("gcsl", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "pyarrow", "numpy",
            "sentence-transformers", "scipy")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary sibling of ``path``; renames it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, obj: Any) -> None:
    """Writes ``obj`` as indented JSON by the package's one conversion (:func:`gcsl.jsonsafe.json_safe`)."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=True, ensure_ascii=False,
                                       allow_nan=False) + "\n")


@contextmanager
def atomic_dir(path: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory that becomes ``path`` only when the block succeeds.

    An existing ``path`` is replaced only with ``overwrite``; otherwise it is an error, so
    finished outputs are never silently clobbered.
    """
    from gcsl.errors import StageError

    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise StageError(f"{path}: output directory exists and is not empty; pass --overwrite or choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _TRACKED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _json_ready(obj: Any) -> Any:
    """Paths and tuples as JSON has them; anything else unknown as its string form."""
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def write_run_record(out_dir: Path, *, stage: str, config: Any, seed: int | None,
                     goals: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                     filename: str = "run.json") -> Path:
    """Writes ``run.json`` (or ``filename``): stage, resolved config, seed, package versions, goal spec."""
    record = {
        "stage": stage,
        "config": config_to_dict(config),
        "seed": seed,
        "versions": package_versions(),
        "goals": goals,
    }
    if extra:
        record.update(extra)
    path = Path(out_dir) / filename
    atomic_write_json(path, _json_ready(record))
    return path
