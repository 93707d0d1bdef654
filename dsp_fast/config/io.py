"""Reading a config (a preset's name or a YAML file, plus overrides) and writing the resolved one to a run folder."""

from __future__ import annotations

from typing import Any

import yaml

from dsp_fast.config.errors import ConfigError, _check
from dsp_fast.config.overrides import config_from_dict, parse_override
from dsp_fast.config.presets import resolve_config
from dsp_fast.config.scaling import apply_lr_scaling
from dsp_fast.config.schema import Config


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML preset (a file, or a shipped preset's name; the defaults when None) and apply
    `section.field=value` overrides."""
    raw: dict[str, Any] = {}
    if path:
        path = resolve_config(path)
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    for text in overrides:
        (section, key), value = parse_override(text)
        raw.setdefault(section, {})
        _check(isinstance(raw[section], dict), section, "expected a mapping of fields")
        raw[section][key] = value
    try:
        return apply_lr_scaling(config_from_dict(raw))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config (tuples as lists) so a run folder says exactly what ran."""
    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    with open(path, "w") as f:
        yaml.safe_dump(plain(cfg.to_dict()), f, sort_keys=False)
