"""Configuration: frozen dataclasses (configs.py, sampling.py), checked where values enter (checks.py), built from
presets, TOML files and KEY=VALUE overrides (overrides.py, presets/*.toml).

Every number a user may want to change is a field, with the same name in a TOML file (`[model] n_layer = 6`), on
the command line (`--set n_layer=6` or `--set model.n_layer=6`) and in Python (`ModelConfig(n_layer=6)`).
"""

from potion.config.configs import SECTIONS, DataConfig, ModelConfig, RunConfig, TrainConfig
from potion.config.overrides import (
    apply_overrides,
    check_architecture,
    load_preset,
    load_toml,
    merge,
    preset_names,
    resolve,
    set_value,
    with_architecture,
)
from potion.config.sampling import DECODE_DTYPES, MAX_DRAFT_TOKENS, SamplingConfig

__all__ = [
    "DECODE_DTYPES",
    "MAX_DRAFT_TOKENS",
    "SECTIONS",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "SamplingConfig",
    "TrainConfig",
    "apply_overrides",
    "check_architecture",
    "load_preset",
    "load_toml",
    "merge",
    "preset_names",
    "resolve",
    "set_value",
    "with_architecture",
]
