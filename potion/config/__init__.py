"""Configuration: frozen dataclasses, TOML presets, and KEY=VALUE overrides.

Every number a user may want to change is a field here, with the same name in a TOML file
(`[model] n_layer = 6`), on the command line (`--set n_layer=6` or `--set model.n_layer=6`) and in Python
(`ModelConfig(n_layer=6)`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from potion.errors import PotionError


@dataclass(frozen=True)
class ModelConfig:
    """The shape of the network. Defaults are GPT-2 small's (124M parameters)."""

    vocab_size: int = 50257
    context_length: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0  # key/value heads, each shared by n_head / n_kv_head query heads; 0 = n_head (one each)
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in the linear layers and norms
    tie_embeddings: bool = True  # the output head reuses the token embedding matrix
    positions: str = "learned"  # learned | rope
    rope_base: float = 10000.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    mlp_activation: str = "gelu"  # gelu | relu2 | swiglu (gated: silu(gate(x)) * up(x))
    mlp_ratio: int = 4  # feed-forward width = mlp_ratio * n_embd, unless ffn_hidden is set
    ffn_hidden: int = 0  # the feed-forward network's inner width; 0 = mlp_ratio * n_embd
    qk_norm: bool = False  # normalise queries and keys per head before the dot product
    zero_init_proj: bool = False  # output projections of attention and MLP start at zero
    zero_init_head: bool = False  # an untied output head that starts at zero
    logit_softcap: float = 0.0  # 0 = off; else logits = cap * tanh(logits / cap)
    value_embeddings: bool = False  # a second token embedding added to every layer's values

    def __post_init__(self):
        _check_types(self, "model")
        _check_choice("positions", self.positions, ("learned", "rope"))
        _check_choice("norm", self.norm, ("layernorm", "rmsnorm"))
        _check_choice("mlp_activation", self.mlp_activation, ("gelu", "relu2", "swiglu"))
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise PotionError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise PotionError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        for name in ("n_kv_head", "ffn_hidden"):
            if getattr(self, name) < 0:
                raise PotionError(f"model.{name} must not be negative (0 picks the default), got {getattr(self, name)}")
        if self.n_kv_head and self.n_head % self.n_kv_head:
            raise PotionError(
                f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head ({self.n_kv_head}): "
                "each key/value head serves the same number of query heads"
            )
        if self.positions == "rope" and (self.n_embd // self.n_head) % 2:
            raise PotionError("rope needs an even head size (n_embd / n_head)")
        _check_range(self, "model", "dropout", 0.0, 1.0, top_open=True)
        _check_range(self, "model", "rope_base", 1.0)
        # logits beyond about 100 already give probabilities of exactly 0 and 1; a cap past float32's range is NaN
        _check_range(self, "model", "logit_softcap", 0.0, MAX_SOFTCAP)
        if self.zero_init_head and self.tie_embeddings:
            raise PotionError("model.zero_init_head needs tie_embeddings = false (a tied head is the embedding)")


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    data: str = "pydocs"  # a file, a directory, a glob, or a built-in name: pydocs | shakespeare
    tokenizer: str = "char"  # char | bpe
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.1  # the last part of the token stream is the validation split

    def __post_init__(self):
        _check_types(self, "data")
        _check_choice("tokenizer", self.tokenizer, ("char", "bpe"))
        if not 0.0 < self.val_fraction < 1.0:
            raise PotionError(f"data.val_fraction must be between 0 and 1, got {self.val_fraction}")
        if not 257 <= self.bpe_vocab_size <= MAX_BPE_VOCAB:
            raise PotionError(
                f"data.bpe_vocab_size must be between 257 (256 bytes + end of text) and {MAX_BPE_VOCAB:,}, "
                f"got {self.bpe_vocab_size}"
            )


@dataclass(frozen=True)
class TrainConfig:
    """How training runs: batch, schedule, optimizer, evaluation and checkpoints."""

    batch_size: int = 32
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 2000
    max_time: float = 0.0  # seconds of wall clock; 0 = no limit
    stop_at_loss: float = 0.0  # stop once the validation loss reaches this; 0 = never
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1  # the schedule decays to learning_rate * min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd (warmup, stable, then linear decay)
    decay_fraction: float = 0.2  # wsd only: the last part of training that decays
    weight_decay: float = 0.1  # applied to matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = no clipping
    max_nonfinite_steps: int = 20  # steps in a row with a NaN/inf loss or gradient (each skipped) before stopping
    optimizer: str = "adamw"  # adamw | muon (muon for hidden matrices, adamw for the rest)
    muon_lr: float = 0.02
    eval_every: int = 250
    eval_batches: int = 20
    eval_train_split: bool = True  # also measure fixed training batches at each evaluation (false: validation only)
    checkpoint_every: int = 0  # 0 = at every evaluation
    keep_checkpoints: int = 2
    sample_tokens: int = 200  # length of the sample printed at each evaluation; 0 = none
    probe: str = ""  # a prompt whose explain data is saved at each evaluation (run_dir/probes/); "" = none
    seed: int = 1337
    init_from: str = ""  # start from this model's weights and tokenizer: a run, a Hugging Face folder or name
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | bf16 | fp32
    compile: str = "auto"  # auto | on | off (auto: for runs long enough to repay it, hardware.compiles_by_default)
    parallel: str = "auto"  # with several processes (torchrun): auto | ddp | fsdp (auto: ddp when the model fits)

    def __post_init__(self):
        _check_types(self, "train")
        _check_choice("schedule", self.schedule, ("cosine", "wsd"))
        _check_choice("optimizer", self.optimizer, ("adamw", "muon"))
        _check_choice("device", self.device, ("auto", "cpu", "cuda", "mps"))
        _check_choice("dtype", self.dtype, ("auto", "bf16", "fp32"))
        _check_choice("compile", self.compile, ("auto", "on", "off"))
        _check_choice("parallel", self.parallel, ("auto", "ddp", "fsdp"))
        for name in ("batch_size", "grad_accum", "eval_every", "eval_batches", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise PotionError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "checkpoint_every", "sample_tokens", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise PotionError(f"train.{name} must not be negative, got {getattr(self, name)}")
        for name in ("learning_rate", "muon_lr"):
            if getattr(self, name) <= 0:
                raise PotionError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("max_time", "stop_at_loss", "weight_decay", "grad_clip"):
            _check_range(self, "train", name, 0.0)
        for name in ("min_lr_ratio", "decay_fraction"):
            _check_range(self, "train", name, 0.0, 1.0)
        for name in ("beta1", "beta2"):
            _check_range(self, "train", name, 0.0, 1.0, top_open=True)
        _check_seed(self.seed, "train.seed")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; written to the run directory as config.json."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.train.grad_accum * self.model.context_length

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "RunConfig":
        unknown = set(d) - set(SECTIONS)
        if unknown:
            raise PotionError(f"{source}: unknown section(s) {sorted(unknown)}; expected {list(SECTIONS)}")
        parts = {}
        for name, klass in SECTIONS.items():
            parts[name] = _build(klass, d.get(name, {}), f"{source} [{name}]")
        return cls(**parts)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PotionError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_types(config, section: str) -> None:
    """Every field of its declared type, and every float finite: a config built in Python is checked like one
    read from TOML, --set or config.json. An int where a float is expected becomes that float."""
    for f in fields(config):
        value, want = getattr(config, f.name), _TYPES.get(f.type)
        if want is None:
            continue  # not a plain int, float, bool or str: the class checks it itself
        if want is float and type(value) is int:
            value = float(value)
            object.__setattr__(config, f.name, value)  # frozen: this is its construction
        if type(value) is not want:
            raise PotionError(f"{section}.{f.name} must be {_TYPE_NAMES[want]}, got {type(value).__name__} {value!r}")
        if want is float and not math.isfinite(value):
            raise PotionError(f"{section}.{f.name} must be a finite number, got {value}")


def _check_range(config, section: str, name: str, low: float, high: float = math.inf, top_open: bool = False):
    """low <= value <= high (value < high with top_open)."""
    value = getattr(config, name)
    if value < low or value > high or (top_open and value == high):
        interval = f"at least {low:g}" if high == math.inf else f"in [{low:g}, {high:g}{')' if top_open else ']'}"
        raise PotionError(f"{section}.{name} must be {interval}, got {value}")


def _check_seed(seed: int, name: str, setting: str | None = None) -> None:
    if not 0 <= seed < 2**63:
        raise PotionError(f"{name} must be between 0 and 2**63 - 1, got {seed}", setting=setting)


def _build(klass, values: dict, source: str):
    known = {f.name: f for f in fields(klass)}
    unknown = set(values) - set(known)
    if unknown:
        raise PotionError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; known keys: {', '.join(known)}")
    checked = {k: _coerce(v, known[k], f"{source} {k}") for k, v in values.items()}
    return klass(**checked)


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
MAX_SOFTCAP = 10_000.0
MAX_BPE_VOCAB = 1 << 24  # token files store ids as uint32; the tokenizers library counts in 32 bits


def _coerce(value: Any, f: dataclasses.Field, where: str) -> Any:
    """Check a TOML/JSON value against the field's type (ints are accepted where floats are expected)."""
    want = _TYPES[f.type] if isinstance(f.type, str) else f.type
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is not bool and isinstance(value, bool) or not isinstance(value, want):
        raise PotionError(f"{where}: expected {want.__name__}, got {type(value).__name__} {value!r}")
    return value


def _parse_text_value(text: str, f: dataclasses.Field, where: str) -> Any:
    """Turn the VALUE of --set KEY=VALUE into the field's type."""
    want = _TYPES[f.type] if isinstance(f.type, str) else f.type
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
    return _with_field(config, section, f, _coerce(value, f, source))


def _with_field(config: RunConfig, section: str, f: dataclasses.Field, value: Any) -> RunConfig:
    return replace(config, **{section: replace(getattr(config, section), **{f.name: value})})


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply --set KEY=VALUE strings, in order."""
    for item in overrides:
        if "=" not in item:
            raise PotionError(f"--set expects KEY=VALUE, got {item!r}")
        key, text = (part.strip() for part in item.split("=", 1))
        section, f = find_field(key)
        config = _with_field(config, section, f, _parse_text_value(text, f, f"--set {key}"))
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
        config = replace(config, **{section: _build(SECTIONS[section], current, f"{source} [{section}]")})
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


MAX_DRAFT_TOKENS = 16  # one check's products stay a few rows, where packed weights keep their speed
DECODE_DTYPES = ("auto", "fp32", "bf16")  # auto, or a name in hardware.DTYPES (kept torch-free here)


@dataclass(frozen=True)
class SamplingConfig:
    """How generation picks tokens and when it stops."""

    max_new_tokens: int = 500
    temperature: float = 0.8  # 0 = greedy: always the most likely token
    top_k: int | None = None  # None = off; else only the k most likely tokens can be drawn
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    num_samples: int = 1
    decode_dtype: str = "auto"  # precision of the weights in one-token decode steps: auto | fp32 | bf16
    # speculative decoding: tokens a 4-bit copy of the model drafts before each check; None = where it pays
    # (a CPU, one sequence, weights too big for the caches), 0 = off. The output is the same either way.
    draft_tokens: int | None = None

    def __post_init__(self):
        self._check_types()
        if self.max_new_tokens < 0:
            raise PotionError(
                f"max_new_tokens must not be negative, got {self.max_new_tokens}", setting="max_new_tokens"
            )
        if not self.temperature >= 0:  # also catches NaN
            raise PotionError(
                f"temperature must be 0 (greedy) or positive, got {self.temperature}", setting="temperature"
            )
        if self.top_k is not None and self.top_k < 1:
            raise PotionError(
                f"top_k must be at least 1 (leave it out for no limit), got {self.top_k}", setting="top_k"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise PotionError(f"top_p must be in (0, 1], got {self.top_p}", setting="top_p")
        if self.num_samples < 1:
            raise PotionError(f"num_samples must be at least 1, got {self.num_samples}", setting="num_samples")
        if self.seed is not None:
            _check_seed(self.seed, "seed", setting="seed")
        if self.draft_tokens is not None and not 0 <= self.draft_tokens <= MAX_DRAFT_TOKENS:
            raise PotionError(
                f"draft_tokens must be from 0 (off) to {MAX_DRAFT_TOKENS}, got {self.draft_tokens}",
                setting="draft_tokens",
            )
        if self.decode_dtype not in DECODE_DTYPES:
            raise PotionError(
                f"decode_dtype must be one of {', '.join(DECODE_DTYPES)}, got {self.decode_dtype!r}",
                setting="decode_dtype",
            )

    def _check_types(self) -> None:
        """Numbers of their type (an int is taken where a float is expected), floats finite, stop strings text."""
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if type(value) is int:
                object.__setattr__(self, name, value := float(value))  # frozen: this is its construction
            if type(value) is not float or not math.isfinite(value):
                raise PotionError(f"{name} must be a finite number, got {value!r}", setting=name)
        for name in ("max_new_tokens", "top_k", "seed", "num_samples", "draft_tokens"):
            value = getattr(self, name)
            if type(value) is not int and not (value is None and name in ("top_k", "seed", "draft_tokens")):
                raise PotionError(f"{name} must be an integer, got {value!r}", setting=name)
        if isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            raise PotionError(f"stop must be a list of strings, got {self.stop!r}", setting="stop")
