"""The one exception tree of gcsl.

::

    GcslError                  every error gcsl raises on purpose; the CLI prints one line, exits 2
    ├── ConfigError            a config field or CLI option is wrong
    ├── DataError              an input file, row or column is wrong
    ├── MissingDependencyError an optional package is not installed (names the install command)
    ├── SandboxError           the code sandbox cannot run safely here
    └── StageError             a pipeline stage cannot continue (e.g. a resume target is missing)

Messages are single lines that say where the problem is and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "GcslError",
    "ConfigError",
    "DataError",
    "MissingDependencyError",
    "SandboxError",
    "StageError",
]


class GcslError(Exception):
    """Base class of every error gcsl raises for a user's mistake or environment."""

    exit_code = 2


class ConfigError(GcslError):
    """A configuration field or command-line option is invalid."""


class DataError(GcslError):
    """Input data is invalid: names the file and line/row and the fix."""


class MissingDependencyError(GcslError):
    """An optional dependency is missing; the message names the install command."""

    @classmethod
    def for_package(cls, package: str, purpose: str, install: str | None = None) -> MissingDependencyError:
        return cls(f"{purpose} needs the package '{package}': install it with `{install or 'pip install ' + package}`")


class SandboxError(GcslError):
    """The sandbox cannot isolate code on this machine."""


class StageError(GcslError):
    """A workflow stage cannot continue."""
