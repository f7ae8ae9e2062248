"""The configs of a run: the model's shape, the data, the training. Frozen dataclasses, checked when built.

Every field has the same name in a TOML file (`[model] n_layer = 6`), on the command line (`--set n_layer=6` or
`--set model.n_layer=6`) and in Python (`ModelConfig(n_layer=6)`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from potion.config.checks import build, check_choice, check_range, check_seed, check_types
from potion.errors import PotionError

MAX_SOFTCAP = 10_000.0
MAX_BPE_VOCAB = 1 << 24  # token files store ids as uint32; the tokenizers library counts in 32 bits
TRACKERS = ("tensorboard", "wandb", "mlflow")  # train.log_to's choices: potion.train.trackers, each an extra
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # train.lora_targets' choices: potion.model.lora


@dataclass(frozen=True)
class ModelConfig:
    """The shape of the network. Defaults are GPT-2 small's (124M parameters)."""

    vocab_size: int = 50257
    context_length: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0  # key/value heads, each shared by n_head / n_kv_head query heads; 0 = n_head (one each)
    n_embd: int = 768
    head_dim: int = 0  # each head's width; 0 = n_embd / n_head (Qwen3 and Gemma use wider heads)
    dropout: float = 0.0
    bias: bool = True  # biases in the linear layers and norms
    qkv_bias: bool = False  # biases on the query, key and value projections alone (Qwen2), whatever `bias` says
    tie_embeddings: bool = True  # the output head reuses the token embedding matrix
    positions: str = "learned"  # learned | rope
    rope_base: float = 10000.0  # rope_theta in Hugging Face configs
    rope_scaling: str = "none"  # none | llama3 (Llama 3.1 / 3.2: long wavelengths slowed by rope_scaling_factor)
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192  # the context the rotations were first trained for
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 0.0  # added to the variance in every norm; 0 = the norm's default (LayerNorm 1e-5, RMSNorm 1e-6)
    mlp_activation: str = "gelu"  # gelu | relu2 | swiglu (gated: silu(gate(x)) * up(x))
    mlp_ratio: int = 4  # feed-forward width = mlp_ratio * n_embd, unless ffn_hidden is set
    ffn_hidden: int = 0  # the feed-forward network's inner width; 0 = mlp_ratio * n_embd
    qk_norm: bool = False  # normalise queries and keys per head before the dot product
    zero_init_proj: bool = False  # output projections of attention and MLP start at zero
    zero_init_head: bool = False  # an untied output head that starts at zero
    logit_softcap: float = 0.0  # 0 = off; else logits = cap * tanh(logits / cap)
    value_embeddings: bool = False  # a second token embedding added to every layer's values

    def __post_init__(self):
        check_types(self, "model")
        check_choice("positions", self.positions, ("learned", "rope"))
        check_choice("norm", self.norm, ("layernorm", "rmsnorm"))
        check_choice("rope_scaling", self.rope_scaling, ("none", "llama3"))
        check_choice("mlp_activation", self.mlp_activation, ("gelu", "relu2", "swiglu"))
        for name in (
            "vocab_size",
            "context_length",
            "n_layer",
            "n_head",
            "n_embd",
            "mlp_ratio",
            "rope_original_context",
        ):
            if getattr(self, name) < 1:
                raise PotionError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head and not self.head_dim:
            raise PotionError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head}), or set head_dim"
            )
        for name in ("n_kv_head", "ffn_hidden", "head_dim"):
            if getattr(self, name) < 0:
                raise PotionError(f"model.{name} must not be negative (0 picks the default), got {getattr(self, name)}")
        if self.n_kv_head and self.n_head % self.n_kv_head:
            raise PotionError(
                f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head ({self.n_kv_head}): "
                "each key/value head serves the same number of query heads"
            )
        if self.positions == "rope" and (self.head_dim or self.n_embd // self.n_head) % 2:
            raise PotionError("rope needs an even head size (head_dim, or n_embd / n_head)")
        check_range(self, "model", "dropout", 0.0, 1.0, top_open=True)
        check_range(self, "model", "rope_base", 1.0)
        check_range(self, "model", "norm_eps", 0.0, 1.0)
        for name in ("rope_scaling_factor", "rope_low_freq_factor"):
            check_range(self, "model", name, 1.0)
        if self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise PotionError("model.rope_high_freq_factor must be greater than model.rope_low_freq_factor")
        # logits beyond about 100 already give probabilities of exactly 0 and 1; a cap past float32's range is NaN
        check_range(self, "model", "logit_softcap", 0.0, MAX_SOFTCAP)
        if self.zero_init_head and self.tie_embeddings:
            raise PotionError("model.zero_init_head needs tie_embeddings = false (a tied head is the embedding)")


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    # a file, a directory, a glob, or a built-in name: pydocs | pydocs-chat | shakespeare; .jsonl files (and
    # pydocs-chat) are conversations, {"messages": [{"role", "content"}, ...]} a line, trained on their replies
    data: str = "pydocs"
    tokenizer: str = "char"  # char | bpe
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.1  # the last part of the token stream (or of the conversations) is the validation split

    def __post_init__(self):
        check_types(self, "data")
        check_choice("tokenizer", self.tokenizer, ("char", "bpe"))
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
    log_to: str = ""  # trackers besides log.jsonl: tensorboard | wandb | mlflow, or several ("tensorboard,wandb")
    # LoRA: train small low-rank adapters beside frozen weights instead of every weight (a fine-tune that keeps
    # only the adapters and their optimizer state: a fraction of the memory and of the checkpoints)
    lora_rank: int = 0  # the adapters' rank r; 0 = off (every weight is trained)
    lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank (peft's and litgpt's rule)
    lora_dropout: float = 0.0  # dropout on what the adapters read (the frozen projection reads its input whole)
    lora_targets: str = "q,k,v,o"  # the projections adapted: q, k, v, o (attention), gate, up, down, or all

    def __post_init__(self):
        check_types(self, "train")
        check_choice("schedule", self.schedule, ("cosine", "wsd"))
        check_choice("optimizer", self.optimizer, ("adamw", "muon"))
        check_choice("device", self.device, ("auto", "cpu", "cuda", "mps"))
        check_choice("dtype", self.dtype, ("auto", "bf16", "fp32"))
        check_choice("compile", self.compile, ("auto", "on", "off"))
        check_choice("parallel", self.parallel, ("auto", "ddp", "fsdp"))
        trackers = list(dict.fromkeys(name.strip() for name in self.log_to.split(",") if name.strip()))
        for name in trackers:
            check_choice("log_to", name, TRACKERS)
        object.__setattr__(self, "log_to", ",".join(trackers))  # one spelling of it; frozen: this is its construction
        targets = {name.strip() for name in self.lora_targets.split(",") if name.strip()}
        for name in targets:
            check_choice("lora_targets", name, (*LORA_TARGETS, "all"))
        spelled = "all" if "all" in targets else ",".join(name for name in LORA_TARGETS if name in targets)
        object.__setattr__(self, "lora_targets", spelled)  # one spelling (in the model's order), as log_to
        if self.lora_rank > 0 and not spelled:
            raise PotionError("train.lora_targets names no projection; choose from q, k, v, o, gate, up, down or all")
        for name in ("batch_size", "grad_accum", "eval_every", "eval_batches", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise PotionError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "checkpoint_every", "sample_tokens", "keep_checkpoints", "lora_rank"):
            if getattr(self, name) < 0:
                raise PotionError(f"train.{name} must not be negative, got {getattr(self, name)}")
        for name in ("learning_rate", "muon_lr"):
            if getattr(self, name) <= 0:
                raise PotionError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("max_time", "stop_at_loss", "weight_decay", "grad_clip"):
            check_range(self, "train", name, 0.0)
        for name in ("min_lr_ratio", "decay_fraction"):
            check_range(self, "train", name, 0.0, 1.0)
        for name in ("beta1", "beta2", "lora_dropout"):
            check_range(self, "train", name, 0.0, 1.0, top_open=True)
        if self.lora_alpha <= 0:
            raise PotionError(f"train.lora_alpha must be positive, got {self.lora_alpha}")
        check_seed(self.seed, "train.seed")


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
            parts[name] = build(klass, d.get(name, {}), f"{source} [{name}]")
        return cls(**parts)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
