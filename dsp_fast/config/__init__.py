"""Typed configuration: dataclasses with one docstring per field, validation in `__post_init__`, YAML presets.

Every deviation from the authors' script listed in docs/method.md is a field here, so both behaviours stay
reproducible. `load_config(spec, overrides)` rejects unknown keys and bad values with the dotted field name. The
presets ship inside the package (`dsp_fast/configs/*.yaml`), so `--config synthetic` works from any folder.

One module per concern, every name importable from here: schema.py (the data / model / train / fast sections and
`Config`), recipe.py (the dsp / optim sections), overrides.py (`section.field=value` and type coercion), presets.py
(the shipped presets by name, also as 'configs/x.yaml'; the unread-field check), io.py (`load_config`, with
optim.lr_scaling resolved there once; `save_config`, `config_yaml`), cli.py (the fast trainer's flags, from the
`fast:` fields).
"""

# ruff: noqa: F401 - the imports below are the package's public names
from dsp_fast.config.cli import add_cli_args, apply_cli_args
from dsp_fast.config.errors import ConfigError
from dsp_fast.config.io import PAPER_BATCH, RESOLVED, apply_lr_scaling, config_yaml, load_config, save_config
from dsp_fast.config.overrides import config_from_dict, parse_override, split_overrides
from dsp_fast.config.presets import PRESET_DIR, check_fields_read, preset_names, presets_help, resolve_config
from dsp_fast.config.recipe import LR_SCALINGS, OPTIM_ALGORITHMS, DSPConfig, OptimConfig
from dsp_fast.config.schema import (
    AMP_CHOICES,
    BENCH_ONLY_BACKENDS,
    COMPILE_MODES,
    DATA_BACKENDS,
    LOADER_BACKENDS,
    MIT_ARCHS,
    MODEL_ARCHS,
    OPTIMIZERS,
    UNCAPTURABLE_OPTIMIZERS,
    Config,
    DataConfig,
    FastConfig,
    ModelConfig,
    TrainConfig,
)
