"""Read a versioned YAML recipe into its dataclass, refusing fields the dataclass does not know."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def load_yaml_dataclass(cls: type[T], path: Path, **overrides: Any) -> T:
    """Return ``cls`` built from the mapping in ``path``, with non-None overrides applied on top."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise ValueError(f"{path}: unknown {cls.__name__} fields {sorted(unknown)}")
    return cls(**data)
