"""Read a versioned YAML recipe into its dataclass, refusing fields it does not know and values of the wrong type.

Errors name the file and the field, never quote the file: a recipe is configuration, but the same loader
must not turn into a way of reading other files.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Return the mapping a YAML file holds (empty for an empty file); errors name the file and the line."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(f"{path.name}: not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: expected a mapping of settings, got {type(data).__name__}")
    return data


def load_yaml_dataclass(cls: type[T], path: Path, **overrides: Any) -> T:
    """Return ``cls`` built from the mapping in ``path``, with non-None overrides applied on top."""
    path = Path(path)
    data = read_yaml_mapping(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in set(data) - fields)
    if unknown:
        raise ValueError(f"{path.name}: unknown {cls.__name__} fields {unknown}")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        problem = _type_problem(hints.get(name), value)
        if problem:
            raise ValueError(f"{path.name}: {name} must be {problem}, got {type(value).__name__}")
    return cls(**data)


def _type_problem(hint: Any, value: Any) -> str | None:
    """Return what ``value`` should have been when it does not fit ``hint`` (simple types only), else None."""
    if hint is None or hint is Any:
        return None
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return None
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return None
        if option is str and isinstance(value, str):
            return None
        if option not in (type(None), bool, int, float, str):
            return None  # containers and records: left to the dataclass's own checks
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text", type(None): "empty"}
    return " or ".join(names.get(o, str(o)) for o in options)


def build(cls: type[T], settings: Any, where: str, error: type[Exception] = ValueError) -> T:
    """Return the dataclass ``cls`` built from a settings mapping: unknown names refused, every value
    type-checked, integer keys restored, then ``check(where)`` run when the class has one. Errors are ``error``
    and name the field by its path (``where``), e.g. ``monitoring.yaml: drift.min_answers``."""
    import math

    settings = {} if settings is None else settings
    if not isinstance(settings, dict):
        raise error(f"{where} must be a mapping of settings")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in set(settings) - known)
    if unknown:
        raise error(f"{where}: unknown settings {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in settings.items():
        hint = hints.get(name)
        problem = _type_problem(hint, value)
        if problem:
            raise error(f"{where}.{name} must be {problem}, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise error(f"{where}.{name} must be a finite number")
        if typing.get_origin(hint) is dict and typing.get_args(hint)[:1] == (int,) and isinstance(value, dict):
            # JSON (XCom, task arguments) turns integer keys into text
            value = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in value.items()}
        if typing.get_origin(hint) is tuple:
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise error(f"{where}.{name} must be a list of text values")
            value = tuple(value)
        values[name] = value
    obj = cls(**values)
    if hasattr(obj, "check"):
        obj.check(where)
    return obj


def positive(where: str, name: str, value: Any, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` unless ``value`` is an integer >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise error(f"{where}.{name} must be a positive integer, got {value!r}")


def fraction(where: str, name: str, value: Any, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` unless ``value`` is a number in [0, 1]."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise error(f"{where}.{name} must be a fraction in [0, 1], got {value}")
