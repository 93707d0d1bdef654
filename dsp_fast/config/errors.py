"""The one error type of the config and the checks every section's `__post_init__` shares."""

from __future__ import annotations

import dataclasses
import math
import re
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


def _field(default: Any, *, choices: tuple[str, ...] = (), within: str = "") -> Any:
    """A field with its allowed values, or the interval its number lies in ('[0, 1)', '[1, inf)'), which
    `_check_fields` and the command line (`config.cli`) both read."""
    return dataclasses.field(default=default, metadata={"choices": choices, "within": within})


def _check_fields(section: Any, name: str) -> None:
    """The `choices` and `within` of every `_field` of `section` (the `name:` section); [width, height] fields made
    tuples of two positive ints; every float finite (inf or nan would train, or fail far from the setting)."""
    for f in dataclasses.fields(section):
        dotted, choices, within = f"{name}.{f.name}", f.metadata.get("choices"), f.metadata.get("within")
        if f.type == "tuple[int, int]":
            setattr(section, f.name, _pair(getattr(section, f.name), dotted))
        value = getattr(section, f.name)
        if "float" in f.type:
            numbers = value if isinstance(value, (list, tuple)) else [value]
            _check(all(not isinstance(v, (int, float)) or math.isfinite(v) for v in numbers), dotted,
                   f"must be a finite number, got {value!r}")
        _check(not choices or value in choices, dotted, f"must be one of {', '.join(choices or ())}, got {value!r}")
        if within:
            left, low, high, right = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", within).groups()
            low, high = float(low), float(high)
            ok = (low <= value if left == "[" else low < value) and (value <= high if right == "]" else value < high)
            bound = f"in {within}" if high != math.inf else f"{'>=' if left == '[' else '>'} {low:g}"
            _check(ok, dotted, f"must be {bound}, got {value}")
