"""The checks every config value passes where it enters: its type, its range, its choices (from Python, TOML,
--set and config.json alike)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import fields
from typing import Any

from potion.errors import PotionError


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PotionError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check_types(config, section: str) -> None:
    """Every field of its declared type, and every float finite: a config built in Python is checked like one
    read from TOML, --set or config.json. An int where a float is expected becomes that float."""
    for f in fields(config):
        value, want = getattr(config, f.name), TYPES.get(f.type)
        if want is None:
            continue  # not a plain int, float, bool or str: the class checks it itself
        if want is float and type(value) is int:
            value = float(value)
            object.__setattr__(config, f.name, value)  # frozen: this is its construction
        if type(value) is not want:
            raise PotionError(f"{section}.{f.name} must be {TYPE_NAMES[want]}, got {type(value).__name__} {value!r}")
        if want is float and not math.isfinite(value):
            raise PotionError(f"{section}.{f.name} must be a finite number, got {value}")


def check_range(config, section: str, name: str, low: float, high: float = math.inf, top_open: bool = False):
    """low <= value <= high (value < high with top_open)."""
    value = getattr(config, name)
    if value < low or value > high or (top_open and value == high):
        interval = f"at least {low:g}" if high == math.inf else f"in [{low:g}, {high:g}{')' if top_open else ']'}"
        raise PotionError(f"{section}.{name} must be {interval}, got {value}")


def check_seed(seed: int, name: str, setting: str | None = None) -> None:
    if not 0 <= seed < 2**63:
        raise PotionError(f"{name} must be between 0 and 2**63 - 1, got {seed}", setting=setting)


def build(klass, values: dict, source: str):
    known = {f.name: f for f in fields(klass)}
    unknown = set(values) - set(known)
    if unknown:
        raise PotionError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; known keys: {', '.join(known)}")
    checked = {k: coerce(v, known[k], f"{source} {k}") for k, v in values.items()}
    return klass(**checked)


TYPES = {"int": int, "float": float, "bool": bool, "str": str}
TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def coerce(value: Any, f: dataclasses.Field, where: str) -> Any:
    """Check a TOML/JSON value against the field's type (ints are accepted where floats are expected)."""
    want = TYPES[f.type] if isinstance(f.type, str) else f.type
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is not bool and isinstance(value, bool) or not isinstance(value, want):
        raise PotionError(f"{where}: expected {want.__name__}, got {type(value).__name__} {value!r}")
    return value


def parse_text_value(text: str, f: dataclasses.Field, where: str) -> Any:
    """Turn the VALUE of --set KEY=VALUE into the field's type."""
    want = TYPES[f.type] if isinstance(f.type, str) else f.type
    try:
        if want is bool:
            lowered = text.strip().lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if want is int:
            return int(text.replace("_", ""))
        if want is float:
            return float(text)
        return text
    except ValueError:
        raise PotionError(f"{where}: {text!r} is not a valid {want.__name__}") from None
