"""The one error type of the config and the checks every section's `__post_init__` shares."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config file or override that names an unknown field or gives a bad value."""


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config field '{name}': {msg}")


def _pair(value: Any, name: str) -> tuple[int, int]:
    _check(isinstance(value, (list, tuple)) and len(value) == 2, name, f"expected [width, height], got {value!r}")
    _check(all(isinstance(v, int) and v > 0 for v in value), name, f"expected two positive integers, got {value!r}")
    return (int(value[0]), int(value[1]))
