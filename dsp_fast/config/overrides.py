"""From text and nested dicts to a Config: the `section.field=value` override grammar, and type coercion that
names the dotted field of any unknown key or bad value."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import yaml

from dsp_fast.config.errors import ConfigError, _check
from dsp_fast.config.presets import check_fields_read
from dsp_fast.config.schema import _SECTION_TYPES, Config

_OVERRIDE = re.compile(r"^[A-Za-z_]\w*\.[A-Za-z_]\w*=")


def _as_float(value: Any, name: str) -> float:
    """A number as typed: ints, floats, and every string float() reads (YAML 1.1, PyYAML's, reads `1e-3` and `1e9`
    as strings but `2.5e-3` as a float; whoever typed either means the number, on the command line or in a file)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"config field '{name}': expected a number, got {value!r}")


def _coerce(value: Any, default: Any, name: str) -> Any:
    """Type-check one value against the field's default; ints, and strings float() reads, are accepted where
    floats are expected (in lists of floats too)."""
    if isinstance(default, bool):
        _check(isinstance(value, bool), name, f"expected true/false, got {value!r}")
    elif isinstance(default, float):
        return _as_float(value, name)
    elif isinstance(default, int):
        _check(isinstance(value, int) and not isinstance(value, bool), name, f"expected an integer, got {value!r}")
    elif isinstance(default, str):
        _check(isinstance(value, str), name, f"expected a string, got {value!r}")
    elif isinstance(default, (list, tuple)):
        _check(isinstance(value, (list, tuple)), name, f"expected a list, got {value!r}")
        if default and all(isinstance(v, float) for v in default):  # e.g. optim.betas: [0.9, 1e-3]
            value = [_as_float(v, name) for v in value]
        return list(value) if isinstance(default, list) else tuple(value)
    return value


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested dicts, naming any unknown section or field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(raw).__name__}")
    sections: dict[str, Any] = {}
    for section, values in raw.items():
        _check(section in _SECTION_TYPES, section, f"unknown section (known: {', '.join(_SECTION_TYPES)})")
        _check(isinstance(values, dict), section, "expected a mapping of fields")
        cls = _SECTION_TYPES[section]
        defaults = cls()
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            _check(key in known, f"{section}.{key}", f"unknown field (known: {', '.join(sorted(known))})")
            kwargs[key] = _coerce(value, getattr(defaults, key), f"{section}.{key}")
        sections[section] = cls(**kwargs)
    cfg = Config(**sections)
    check_fields_read(cfg)
    return cfg
def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.max_steps=100' -> (['train', 'max_steps'], 100); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.field=value")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2:
        raise ConfigError(f"override {text!r}: expected section.field=value")
    return parts, yaml.safe_load(value)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(flags, overrides): every `section.field=value` word is an override wherever it stands, so flags and
    overrides mix in any order (and `--resume` without a PATH never swallows an override)."""
    flags = [a for a in argv if not _OVERRIDE.match(a)]
    return flags, [a for a in argv if _OVERRIDE.match(a)]
