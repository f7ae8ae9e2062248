"""From presets, TOML files and --set KEY=VALUE to one RunConfig; what a fine-tuning run may change."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from potion.config.checks import build, coerce, parse_text_value
from potion.config.configs import SECTIONS, ModelConfig, RunConfig
from potion.errors import PotionError


def find_field(key: str) -> tuple[str, dataclasses.Field]:
    """Resolve 'n_layer' or 'model.n_layer' to (section, field)."""
    if "." in key:
        section, name = key.split(".", 1)
        klass = SECTIONS.get(section)
        if klass is None:
            raise PotionError(f"unknown config section {section!r} in {key!r}; sections: {', '.join(SECTIONS)}")
        matches = [(section, f) for f in fields(klass) if f.name == name]
    else:
        matches = [(s, f) for s, klass in SECTIONS.items() for f in fields(klass) if f.name == key]
    if not matches:
        raise PotionError(f"unknown config key {key!r}; see `potion presets` or config.json of a run for the keys")
    if len(matches) > 1:
        raise PotionError(
            f"config key {key!r} is ambiguous; write it as " + " or ".join(f"{s}.{key}" for s, _ in matches)
        )
    return matches[0]


def set_value(config: RunConfig, key: str, value: Any, source: str) -> RunConfig:
    """Set one field ('n_layer' or 'model.n_layer') to a value of its type."""
    section, f = find_field(key)
    return _with_field(config, section, f, coerce(value, f, source))


def _with_field(config: RunConfig, section: str, f: dataclasses.Field, value: Any) -> RunConfig:
    return replace(config, **{section: replace(getattr(config, section), **{f.name: value})})


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply --set KEY=VALUE strings, in order."""
    for item in overrides:
        if "=" not in item:
            raise PotionError(f"--set expects KEY=VALUE, got {item!r}")
        key, text = (part.strip() for part in item.split("=", 1))
        section, f = find_field(key)
        config = _with_field(config, section, f, parse_text_value(text, f, f"--set {key}"))
    return config


# Model fields a fine-tuning run may change from the model it starts from: dropout, and a shorter context.
FINE_TUNE_CHANGES = ("dropout", "context_length")


def with_architecture(config: RunConfig, source: RunConfig) -> RunConfig:
    """config, with the model and tokenizer of the run or model it starts from (--init-from); dropout stays."""
    model = replace(source.model, dropout=config.model.dropout)
    data = replace(config.data, tokenizer=source.data.tokenizer, bpe_vocab_size=source.data.bpe_vocab_size)
    return replace(config, model=model, data=data)


def check_architecture(config: ModelConfig, source: ModelConfig, name: str) -> None:
    """A fine-tuning run keeps the architecture of the model it starts from; only FINE_TUNE_CHANGES may differ."""
    if config.context_length > source.context_length:
        raise PotionError(
            f"model.context_length = {config.context_length} is longer than the context of --init-from {name} "
            f"({source.context_length}); choose at most {source.context_length}",
            setting="context_length",
        )
    for f in fields(ModelConfig):
        ours, theirs = getattr(config, f.name), getattr(source, f.name)
        if f.name not in FINE_TUNE_CHANGES and ours != theirs:
            raise PotionError(
                f"model.{f.name} = {ours!r} contradicts the model in --init-from {name}, which has {theirs!r}; "
                "leave it out: the architecture comes from the model you start from",
                setting=f.name,
            )


def merge(config: RunConfig, d: dict, source: str) -> RunConfig:
    """Overlay a partial {section: {key: value}} dict (from a TOML file) on a config."""
    unknown = set(d) - set(SECTIONS)
    if unknown:
        raise PotionError(f"{source}: unknown section(s) {sorted(unknown)}; expected {list(SECTIONS)}")
    for section, values in d.items():
        if not isinstance(values, dict):
            raise PotionError(f"{source}: [{section}] must be a table of key = value lines")
        current = dataclasses.asdict(getattr(config, section))
        current.update(values)
        config = replace(config, **{section: build(SECTIONS[section], current, f"{source} [{section}]")})
    return config


def preset_names() -> list[str]:
    folder = resources.files("potion.config") / "presets"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> RunConfig:
    path = resources.files("potion.config") / "presets" / f"{name}.toml"
    if not path.is_file():
        raise PotionError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    return merge(RunConfig(), tomllib.loads(path.read_text(encoding="utf-8")), f"preset {name}")


def load_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise PotionError(f"config file '{p}' does not exist")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PotionError(f"config file '{p}' is not valid TOML: {e}") from None


def resolve(
    preset: str | None = "tiny",
    config_file: str | None = None,
    overrides: list[str] = (),
    base: RunConfig | None = None,
    values: dict[str, Any] | None = None,
) -> RunConfig:
    """A preset (or a base config), then a TOML file, then --set overrides, then typed values (the command line's
    own flags): later ones win."""
    config = load_preset(preset) if preset or base is None else base
    if config_file:
        config = merge(config, load_toml(config_file), f"config file '{config_file}'")
    config = apply_overrides(config, list(overrides))
    for key, value in (values or {}).items():
        config = set_value(config, key, value, key)
    return config
