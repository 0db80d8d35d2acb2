"""Typed configs: dataclasses whose fields carry their help text once, loaded from YAML and CLI.

Every workflow takes one config dataclass. ``add_arguments`` turns its fields into argparse
options (``--field-name``); ``resolve_config`` merges, in order, the dataclass defaults, an
optional ``--config`` YAML file and the options given on the command line, then validates every
field and raises one :class:`~gcsl.errors.ConfigError` listing all problems.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from gcsl.errors import ConfigError

__all__ = ["field", "add_arguments", "resolve_config", "load_yaml", "config_to_dict"]

T = TypeVar("T")
_UNSET = object()


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
          flag: str | None = None, nargs: int | str | None = None, cli: bool = True) -> Any:
    """A dataclass field with its help text; ``flag`` overrides the derived ``--option-name``."""
    meta = {"help": help, "flag": flag, "nargs": nargs, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, with_config: bool = True) -> None:
    """Adds one option per CLI-visible field of ``cls``; values default to 'not given'."""
    if with_config:
        parser.add_argument("--config", type=Path, default=None,
                            help="YAML file with any of the options below (CLI options override it)")
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        tp, _ = _unwrap_optional(hints[f.name])
        kwargs: dict[str, Any] = {"dest": f.name, "default": _UNSET, "help": meta.get("help", "")}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            origin = get_origin(tp)
            if origin in (list, tuple):
                inner = get_args(tp)[0]
                kwargs["nargs"] = meta.get("nargs") or "+"
                kwargs["type"] = _scalar_parser(inner)
            else:
                kwargs["type"] = _scalar_parser(tp)
                if origin is Literal:
                    kwargs["choices"] = list(get_args(tp))
                if meta.get("nargs"):
                    kwargs["nargs"] = meta["nargs"]
        if "action" not in kwargs:
            kwargs["action"] = _Once  # a second --score-column must not silently replace the first
        parser.add_argument(flag, **kwargs)


class _Once(argparse.Action):
    """Stores an option's value, refusing the option when it is given twice on one command line."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, _UNSET) is not _UNSET:
            raise ConfigError(f"{option_string}: given more than once; give it once (the last would silently win)")
        setattr(namespace, self.dest, values)


def _scalar_parser(tp: Any):
    if get_origin(tp) is Literal:
        return type(get_args(tp)[0])
    if tp in (int, float, str, Path):
        return tp
    return str


def load_yaml(path: Path) -> dict[str, Any]:
    """Reads a YAML mapping; a missing file or bad YAML is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; check the path given to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f"{path}:{line + 1}" if line is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of option: value")
    return data


def _coerce(name: str, value: Any, tp: Any, problems: list[str]) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        problems.append(f"{name}: must not be empty")
        return value
    origin = get_origin(tp)
    try:
        if origin is Literal:
            choices = get_args(tp)
            if value not in choices:
                problems.append(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")
            return value
        if origin in (list, tuple):
            if not isinstance(value, (list, tuple)):
                value = [value]
            inner = get_args(tp)[0]
            items = [_coerce(f"{name}[{i}]", v, inner, problems) for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
        if origin is dict or tp is dict:
            if not isinstance(value, dict):
                problems.append(f"{name}: expected a mapping, got {value!r}")
            return value
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
                return value.lower() in ("true", "yes")
            problems.append(f"{name}: expected true or false, got {value!r}")
            return value
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is Path:
            return Path(value)
        if tp is str:
            return str(value)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problems.append(f"{name}: expected a mapping")
                return value
            return _build(tp, value, problems, prefix=f"{name}.")
    except (TypeError, ValueError):
        problems.append(f"{name}: {value!r} is not a valid {getattr(tp, '__name__', tp)}")
        return value
    return value


def _build(cls: type[T], values: dict[str, Any], problems: list[str], prefix: str = "") -> T:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            problems.append(f"{prefix}{key}: unknown option; valid options are {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            kwargs[f.name] = _coerce(prefix + f.name, values[f.name], hints[f.name], problems)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{prefix}{f.name}: required; give --{f.name.replace('_', '-')} or set it in the config")
    if problems:
        return None  # type: ignore[return-value]
    return cls(**kwargs)


def resolve_config(cls: type[T], *, yaml_path: Path | None = None, args: argparse.Namespace | None = None,
                   overrides: dict[str, Any] | None = None) -> T:
    """Defaults < YAML file < parsed CLI args < explicit overrides; validates all fields at once.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class C:
    ...     bins: int = field(5, help="number of bins")
    >>> resolve_config(C, overrides={"bins": "7"}).bins
    7
    """
    values: dict[str, Any] = {}
    if yaml_path is not None:
        values.update(load_yaml(yaml_path))
    if args is not None:
        values.update({k: v for k, v in vars(args).items() if v is not _UNSET and k in
                       {f.name for f in dataclasses.fields(cls)}})
    if overrides:
        values.update(overrides)
    values = {k.replace("-", "_"): v for k, v in values.items()}
    problems: list[str] = []
    cfg = _build(cls, values, problems)
    if not problems:
        validate = getattr(cfg, "validate", None)
        if validate is not None:
            problems.extend(validate())
    if problems:
        src = f" (config {yaml_path})" if yaml_path else ""
        raise ConfigError(f"invalid {cls.__name__}{src}: " + "; ".join(problems))
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-safe dict of a config dataclass (paths as strings, tuples as lists)."""
    from gcsl.jsonsafe import json_safe

    return json_safe(cfg)
