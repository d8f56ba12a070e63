"""Typed configs: dataclasses with working defaults, overridden from YAML files or ``key=value`` pairs.

A wrong key or a value of the wrong type fails at start-up with the field's name and what is allowed,
never deep inside training (solo-learn's users lost runs to silently ignored keys).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from sslbench.errors import ConfigError


def _convert(name: str, raw: Any, annotation: Any) -> Any:
    """Convert ``raw`` (a string from the CLI, or a YAML value) to the field's annotated type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(name, raw, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"option {name}={raw!r} is invalid")
    if origin is tuple:
        items = raw if isinstance(raw, (list, tuple)) else [s for s in str(raw).strip("()[] ").split(",") if s.strip()]
        item_types = args if args and args[-1] is not Ellipsis else (args[0],) * len(items)
        if len(item_types) != len(items):
            raise ConfigError(f"option {name}={raw!r} needs {len(item_types)} comma-separated values")
        return tuple(_convert(name, item, t) for item, t in zip(items, item_types))
    if origin is list:
        items = raw if isinstance(raw, (list, tuple)) else [s for s in str(raw).strip("[] ").split(",") if s.strip()]
        return [_convert(name, item, args[0]) for item in items]
    if origin is typing.Literal:
        if raw not in args:
            raise ConfigError(f"option {name}={raw!r} is not allowed; use one of {', '.join(map(str, args))}")
        return raw
    try:
        if annotation is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if annotation is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError(raw)
        return annotation(raw)
    except (TypeError, ValueError):
        type_name = getattr(annotation, "__name__", str(annotation))
        raise ConfigError(f"option {name}={raw!r} is not a valid {type_name}; give a {type_name} value") from None


def apply_overrides(config: Any, overrides: dict[str, Any], where: str = "") -> Any:
    """A copy of dataclass ``config`` with ``overrides`` applied and type-checked."""
    hints = typing.get_type_hints(type(config))
    names = {f.name for f in dataclasses.fields(config)}
    changes = {}
    for key, raw in overrides.items():
        if key not in names:
            raise ConfigError(f"unknown option {key!r}{where}; allowed: {', '.join(sorted(names))}")
        changes[key] = _convert(key, raw, hints[key])
    return dataclasses.replace(config, **changes)


def parse_pairs(pairs: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}`` (the CLI's repeated ``--set``)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r} is not KEY=VALUE; write e.g. --set temperature=0.2")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping, or a one-line error naming the file."""
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass the path of an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML ({str(exc).splitlines()[0]}); fix its syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    return data


def check_range(name: str, value: float | int | None, low: float | None = None, high: float | None = None) -> None:
    """Raise a ConfigError naming ``name`` when ``value`` is outside [low, high]."""
    if value is None:
        return
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else (f"<= {high}" if low is None else f"in [{low}, {high}]")
        raise ConfigError(f"option {name}={value} is out of range; use a value {bounds}")
