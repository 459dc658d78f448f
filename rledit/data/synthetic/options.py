"""Building the synthetic world's config dataclasses from plain mappings (as Hydra passes them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

from rledit.errors import ConfigError

ConfigT = TypeVar("ConfigT")


def config_from_mapping(cls: type[ConfigT], values: Mapping[str, Any] | None, section: str) -> ConfigT:
    """`cls(**values)`, but an unknown key is a ConfigError naming it, not a TypeError or a silent default."""
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {section} option(s) {unknown}; known: {sorted(known)}")
    return cls(**values)
