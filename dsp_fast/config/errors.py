"""The one error type of the config and the checks every section's `__post_init__` shares."""

from __future__ import annotations

import dataclasses
from typing import Any


class ConfigError(ValueError):
    """A config file, override or flag that names an unknown field or gives a bad value; every entry point exits 2
    on it with its one line."""


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config field '{name}': {msg}")


def _pair(value: Any, name: str) -> tuple[int, int]:
    _check(isinstance(value, (list, tuple)) and len(value) == 2, name, f"expected [width, height], got {value!r}")
    _check(all(isinstance(v, int) and v > 0 for v in value), name, f"expected two positive integers, got {value!r}")
    return (int(value[0]), int(value[1]))


def _field(default: Any, *, choices: tuple[str, ...] = (), at_least: float | None = None) -> Any:
    """A field with its allowed values or lower bound on it, so that `_check_fields` and the command line
    (`config.cli`) read them from one place."""
    return dataclasses.field(default=default, metadata={"choices": choices, "at_least": at_least})


def _check_fields(section: Any, name: str) -> None:
    """The `choices` and `at_least` of every `_field` of `section` (the `name:` section)."""
    for f in dataclasses.fields(section):
        value, choices, low = getattr(section, f.name), f.metadata.get("choices"), f.metadata.get("at_least")
        _check(not choices or value in choices, f"{name}.{f.name}",
               f"must be one of {', '.join(choices or ())}, got {value!r}")
        _check(low is None or value >= low, f"{name}.{f.name}", f"must be >= {low}, got {value}")
