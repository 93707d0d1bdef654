"""The presets shipped in the package (`dsp_fast/configs/*.yaml`), found by name from any folder, and the check
that names them when a field is set that the chosen data source never reads."""

from __future__ import annotations

import os

import yaml

from dsp_fast.config.errors import ConfigError
from dsp_fast.config.schema import Config, DataConfig

PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
"""The presets shipped with the package (installed with it as package data)."""


def preset_names() -> list[str]:
    """Names of the shipped presets ('synthetic', 'gta2cs', ...)."""
    return sorted(n[:-5] for n in os.listdir(PRESET_DIR) if n.endswith(".yaml"))


def preset_summary(name: str) -> str:
    """What preset `name` is: the first line of its YAML when it is a comment ('' otherwise), one line for --help."""
    with open(os.path.join(PRESET_DIR, f"{name}.yaml")) as f:
        first = f.readline().strip()
    if not first.startswith("#"):
        return ""
    line = first.lstrip("#").strip()
    if not line.endswith((".", ":")) and ": " in line:  # a clause running on to the next line: up to its colon
        line = line.rsplit(": ", 1)[0]
    return line.rstrip(".:")


def presets_help() -> str:
    """The shipped presets, one line each with its summary: the --help epilog of both trainers."""
    names = preset_names()
    width = max(map(len, names))
    lines = [f"  {n:<{width}}  {preset_summary(n)}".rstrip() for n in names]
    return "presets (--config NAME; dsp_fast/configs/NAME.yaml):\n" + "\n".join(lines)


def resolve_config(spec: str) -> str:
    """The YAML file `spec` names: an existing file, else a shipped preset by name ('gta2cs', 'gta2cs.yaml', or
    'configs/gta2cs.yaml' as the presets were spelled before they moved into the package)."""
    if os.path.isfile(spec):
        return spec
    folder, base = os.path.split(spec)
    name = base[:-5] if base.endswith(".yaml") else base
    preset = os.path.join(PRESET_DIR, f"{name}.yaml")
    if folder.rstrip("/") in ("", "configs") and os.path.isfile(preset):
        return preset
    raise ConfigError(f"config file not found: {spec} (not a file, nor a preset name: {', '.join(preset_names())})")


def _presets_for_source(source: str) -> list[str]:
    """The shipped presets whose data.source is `source` (read from their YAML, so the list follows the files)."""
    names = []
    for name in preset_names():
        with open(os.path.join(PRESET_DIR, f"{name}.yaml")) as f:
            raw = yaml.safe_load(f) or {}
        if (raw.get("data") or {}).get("source", DataConfig.source) == source:
            names.append(name)
    return names


def check_fields_read(cfg: Config) -> None:
    """A field the chosen data source never reads, set, is an error naming it and the presets that read it (a real
    data root under the synthetic source would train on generated scenes). A preset's defaults never trip it."""
    d, default = cfg.data, DataConfig()

    def presets(source: str) -> str:
        found = _presets_for_source(source)
        return f"--config {' or --config '.join(found)}" if found else f"data.source={source}"

    # the messages (which read the preset files) are built only for a field that is set
    if d.source == "synthetic":
        for name in ("source_root", "target_root"):
            if getattr(d, name):
                raise ConfigError(f"config field 'data.{name}': {getattr(d, name)!r} is not read with data.source "
                                  "'synthetic' (the built-in generated scenes under data.synthetic_root); for GTA5 "
                                  f"use {presets('gta5')}, for SYNTHIA {presets('synthia')} (or set data.source)")
    else:
        for name in ("synthetic_root", "synthetic_seed"):
            value = getattr(d, name)
            if value != getattr(default, name):
                raise ConfigError(f"config field 'data.{name}': {value!r} is read only with data.source 'synthetic' "
                                  f"({presets('synthetic')}); this config trains on {d.source!r} from "
                                  "data.source_root")
