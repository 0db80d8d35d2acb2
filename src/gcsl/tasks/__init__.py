"""Evaluation tasks, one package each, behind one registry.

::

    TASKS["sentiment"]   the Task of gcsl.tasks.sentiment (its package is imported on first use)
    get_task("poetry")   ConfigError: task: 'poetry' is not one of toxicity, sentiment, code, recommendation

A task is a package ``gcsl.tasks.<name>`` that exports one :class:`~gcsl.tasks.base.Task` as
``TASK``; adding one is that package plus one line in ``_PACKAGES``. Packages are imported only
when their task is used, so evaluating sentiment never imports the code sandbox or
sentence-transformers.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from gcsl.errors import ConfigError, StageError
from gcsl.tasks.base import MetricSpec, Task, TaskResult

__all__ = ["TASKS", "get_task", "Task", "MetricSpec", "TaskResult"]

# task name -> the package that exports its TASK
_PACKAGES = {
    "toxicity": "gcsl.tasks.toxicity",
    "sentiment": "gcsl.tasks.sentiment",
    "code": "gcsl.tasks.code",
    "recommendation": "gcsl.tasks.recommendation",
}


def get_task(name: str) -> Task:
    """The task called ``name``, its package imported on demand.

    >>> get_task("sentiment").eval_config.__name__
    'SentimentEvalConfig'
    """
    if name not in _PACKAGES:
        raise ConfigError(f"task: {name!r} is not one of {', '.join(_PACKAGES)}; choose one of them")
    package = _PACKAGES[name]
    try:
        module = importlib.import_module(package)
    except ModuleNotFoundError as exc:
        if exc.name != package:
            raise
        raise StageError(f"task {name!r} is not available in this installation ({package} is missing)") from None
    task = module.TASK
    if task.name != name:  # a copy-pasted package must not answer for another task
        raise StageError(f"{package}.TASK is named {task.name!r}, not {name!r}; fix its name")
    return task


class _Registry(Mapping[str, Task]):
    """A read-only name -> Task mapping whose values are imported when looked up, never when listed."""

    def __getitem__(self, name: str) -> Task:
        if name not in _PACKAGES:
            raise KeyError(name)
        return get_task(name)

    def __iter__(self) -> Iterator[str]:
        return iter(_PACKAGES)

    def __len__(self) -> int:
        return len(_PACKAGES)

    def __contains__(self, name: object) -> bool:
        return name in _PACKAGES

    def __repr__(self) -> str:
        return f"TASKS({', '.join(_PACKAGES)})"


TASKS: Mapping[str, Task] = _Registry()
