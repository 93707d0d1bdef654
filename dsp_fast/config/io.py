"""Reading a config (a preset's name or a YAML file, plus overrides; optim.lr_scaling resolved once) and writing the
resolved one to a run folder."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import yaml

from dsp_fast.config.errors import ConfigError, _check
from dsp_fast.config.overrides import config_from_dict, parse_override
from dsp_fast.config.presets import preset_names, resolve_config
from dsp_fast.config.schema import _SECTION_TYPES, Config

PAPER_BATCH = 2  # images per domain per step in the paper: the batch optim.lr_scaling scales from
RESOLVED = "resolved"
"""The mapping a run's config.yaml holds beside the sections: what the machine made of the settings (amp, data
backend, device, ...). A record, not a setting: loading skips it, so a resume on another machine resolves again."""


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML preset (a file, or a shipped preset's name; the defaults when None) and apply
    `section.field=value` overrides."""
    raw: dict[str, Any] = {}
    if path:
        path = resolve_config(path)
        with open(path) as f:
            try:
                raw = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path}: not valid YAML ({e})") from None
        # an empty file would silently train every default (DeepLabv2 ResNet-101 at full size): say what it lacks
        if not raw or not isinstance(raw, dict):
            what = "empty config file" if not raw else f"a YAML {type(raw).__name__}, not a mapping of sections"
            raise ConfigError(f"config file {path}: {what}; name a preset ({', '.join(preset_names())}) or give "
                              f"sections ({', '.join(f'{k}:' for k in _SECTION_TYPES)}) with the fields to set")
        raw.pop(RESOLVED, None)
    for text in overrides:
        (section, key), value = parse_override(text)
        raw.setdefault(section, {})
        _check(isinstance(raw[section], dict), section, "expected a mapping of fields")
        raw[section][key] = value
    try:
        return apply_lr_scaling(config_from_dict(raw))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def apply_lr_scaling(cfg: Config) -> Config:
    """optim.lr_scaling resolved: lr x k (linear) or x sqrt(k), train.max_steps and optim.warmup_steps / k, with
    k = data.batch_size / 2; the result says 'none' so that loading it again does not scale twice."""
    o = cfg.optim
    if o.lr_scaling == "none":
        return cfg
    k = cfg.data.batch_size / PAPER_BATCH
    lr = o.lr * (k if o.lr_scaling == "linear" else k ** 0.5)
    optim = dataclasses.replace(o, lr=lr, lr_scaling="none", warmup_steps=round(o.warmup_steps / k))
    train = dataclasses.replace(cfg.train, max_steps=max(1, round(cfg.train.max_steps / k)))
    return dataclasses.replace(cfg, optim=optim, train=train)


def config_yaml(cfg: Config, resolved: dict[str, Any] | None = None) -> str:
    """The config as YAML (through JSON: tuples as lists), with `resolved` (what the run made of it) under RESOLVED
    after the sections when given."""
    text = yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False)
    if resolved:
        text += (f"# what this machine made of the settings above; a record only: loading this file skips it and a "
                 f"resume resolves them again\n{yaml.safe_dump({RESOLVED: resolved}, sort_keys=False)}")
    return text


def save_config(cfg: Config, path: str, resolved: dict[str, Any] | None = None) -> None:
    """Write the resolved config so a run folder says exactly what ran (`config_yaml`)."""
    with open(path, "w") as f:
        f.write(config_yaml(cfg, resolved))
