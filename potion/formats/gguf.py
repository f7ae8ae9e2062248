"""A GGUF file (llama.cpp's format) read as a potion model: its metadata as a ModelConfig, its tensors dequantized
to potion-named float32 weights, its vocabulary as a `tokenizers` tokenizer (gguf_tokenizer.py).

Architectures "llama" (Llama, Llama 3, Mistral, SmolLM2), "qwen2" (biases on the query, key and value projections)
and "qwen3" (per-head query and key norms) are potion's one Llama-family GPT. llama.cpp's converter reorders the
rows of each llama query and key head for its rotary layout; reading undoes that, so the weights are the ones the
Hugging Face folder holds.

The file is untrusted input, read through the `gguf` package: every tensor's shape and type is checked against
the metadata before anything is dequantized, and then one tensor at a time, a block of rows at a time, straight
into its float32 destination (the file itself is memory-mapped).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from potion.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from potion.config.configs import MAX_BPE_VOCAB
from potion.data.chat import ChatTemplate
from potion.data.tokenizer import EOT, BPETokenizer
from potion.errors import PotionError, require
from potion.formats.gguf_tokenizer import check_kind, gguf_tokenizer
from potion.formats.hf import llama

ARCHITECTURES = ("llama", "qwen2", "qwen3")
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
BLOCK_NAMES = {  # potion's name -> llama.cpp's, inside each block
    "norm1": "attn_norm",
    "norm2": "ffn_norm",
    "attn.query": "attn_q",
    "attn.key": "attn_k",
    "attn.value": "attn_v",
    "attn.proj": "attn_output",
    "attn.q_norm": "attn_q_norm",
    "attn.k_norm": "attn_k_norm",
    "mlp.gate": "ffn_gate",
    "mlp.up": "ffn_up",
    "mlp.down": "ffn_down",
}
OUTSIDE_NAMES = {"token_embedding": "token_embd", "final_norm": "output_norm", "head": "output"}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3's rope scaling, as llama.cpp stores it: a divisor per frequency
CHUNK = 1 << 20  # numbers dequantized at once: a few MB of temporaries, whatever the tensor's size
MISSING = object()


def read_gguf(path: str | Path) -> tuple[RunConfig, BPETokenizer, dict[str, torch.Tensor]]:
    """The run config, tokenizer and potion-named float32 weights of a GGUF file."""
    reader = open_gguf(path)
    where = f"'{path}'"
    config = run_config(reader, path)
    permuted = architecture(reader, where) == "llama"  # llama.cpp reorders only llama's query and key rows
    tensors = {t.name: t for t in reader.tensors}
    check_tensors(tensors, config.model, where)  # before anything is dequantized
    tokenizer = read_tokenizer(reader, where)
    reader.fields.clear()  # the vocabulary's 100k small arrays, freed before the weights are allocated
    if tokenizer.vocab_size > config.model.vocab_size:
        raise PotionError(
            f"{where}: its tokenizer has {tokenizer.vocab_size} tokens but token_embd.weight only "
            f"{config.model.vocab_size} rows"
        )
    return config, tokenizer, read_weights(tensors, config.model, permuted)


def gguf_run_config(path: str | Path) -> RunConfig:
    """The run config of a GGUF file, from its metadata and tensor shapes alone (no weights are read)."""
    return run_config(open_gguf(path), path)


def run_config(reader, path: str | Path) -> RunConfig:
    model = model_config(reader, f"'{path}'")
    data = DataConfig(data="", tokenizer="bpe", bpe_vocab_size=min(max(model.vocab_size, 257), MAX_BPE_VOCAB))
    return RunConfig(model=model, data=data, train=TrainConfig(init_from=str(path)))


# ---------------------------------------------------------------- the file


@functools.cache
def reader_class():
    """GGUFReader over a plain ndarray view of its memory map: the reader slices the map once per string of the
    vocabulary, and every slice of an np.memmap runs Python code (__array_finalize__); on a plain view the
    SmolLM2 file's 98k strings take a third of the time. The pages are the same memory-mapped file."""
    gguf = require("gguf", "gguf", "reading a GGUF file")

    class Reader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, mapped):
            self._plain = mapped.view(np.ndarray)

    return Reader


def open_gguf(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise PotionError(f"'{path}' is not a file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise PotionError(f"'{path}' cannot be read ({e.strerror})") from None
    if magic != b"GGUF":
        raise PotionError(f"'{path}' is not a GGUF file (it does not start with the bytes GGUF)")
    try:
        return reader_class()(path)
    except Exception as e:  # the reader raises what numpy raises on a short or damaged file
        raise PotionError(f"'{path}' is not a readable GGUF file; it may be truncated or damaged ({e})") from None


def scalar(reader, key: str, where: str, kind: type, default=MISSING):
    """One metadata value of the kind wanted (int, float, str); default when absent, an error without one."""
    from gguf import GGUFValueType as T

    field = reader.fields.get(key)
    if field is None:
        if default is MISSING:
            raise PotionError(f"{where} has no {key} in its metadata")
        return default
    kinds = {
        int: (T.UINT8, T.INT8, T.UINT16, T.INT16, T.UINT32, T.INT32, T.UINT64, T.INT64),
        float: (T.FLOAT32, T.FLOAT64, T.UINT32, T.INT32, T.UINT64, T.INT64),
        str: (T.STRING,),
    }[kind]
    if len(field.types) != 1 or field.types[0] not in kinds:
        raise PotionError(f"{where}: {key} must be one {kind.__name__}, the file has {[t.name for t in field.types]}")
    try:
        return kind(field.contents())
    except UnicodeDecodeError:
        raise PotionError(f"{where}: {key} is not UTF-8 text") from None


def array(reader, key: str, where: str, kind: type) -> list:
    """A metadata array of strings or integers."""
    from gguf import GGUFValueType as T

    field = reader.fields.get(key)
    if field is None:
        raise PotionError(f"{where} has no {key} in its metadata")
    if field.types[0] != T.ARRAY or (len(field.data) and (field.types[-1] == T.STRING) != (kind is str)):
        raise PotionError(f"{where}: {key} must be an array of {kind.__name__}")
    try:
        return field.contents() if len(field.data) else []
    except UnicodeDecodeError:
        raise PotionError(f"{where}: {key} holds text that is not UTF-8") from None


def architecture(reader, where: str) -> str:
    arch = scalar(reader, "general.architecture", where, str)
    if arch not in ARCHITECTURES:
        raise PotionError(
            f"{where} holds a {arch!r} model; potion reads GGUF files of the {', '.join(ARCHITECTURES)} architectures"
        )
    return arch


# ---------------------------------------------------------------- metadata -> ModelConfig


def model_config(reader, where: str) -> ModelConfig:
    """The GGUF metadata as potion's ModelConfig; whatever potion would compute differently is refused."""
    arch = architecture(reader, where)

    def size(name: str, default=MISSING) -> int:
        value = scalar(reader, f"{arch}.{name}", where, int, default)
        if not 1 <= value <= llama.MAX_SIZE:
            raise PotionError(f"{where}: {arch}.{name} = {value} is not a plausible size (1 to {llama.MAX_SIZE:,})")
        return value

    n_layer, n_embd, n_head = size("block_count"), size("embedding_length"), size("attention.head_count")
    if n_layer > llama.MAX_LAYERS:
        raise PotionError(f"{where}: {arch}.block_count = {n_layer} is not a plausible model")
    n_kv_head = size("attention.head_count_kv", n_head)
    head_dim = size("attention.key_length", max(n_embd // n_head, 1))
    if n_head % n_kv_head:
        raise PotionError(f"{where}: {n_head} query heads are not a multiple of {n_kv_head} key/value heads")
    for name in ("attention.value_length", "rope.dimension_count"):
        if size(name, head_dim) != head_dim:
            raise PotionError(f"{where}: {arch}.{name} differs from the head size {head_dim}; potion has one size")
    tensors = {t.name: t for t in reader.tensors}
    stated_vocab = size("vocab_size") if f"{arch}.vocab_size" in reader.fields else 0  # older files leave it out
    vocab = vocab_size(tensors, stated_vocab, where)
    bias = "blk.0.attn_output.bias" in tensors
    base = positive(scalar(reader, f"{arch}.rope.freq_base", where, float, 10000.0), f"{arch}.rope.freq_base", where)
    eps = scalar(reader, f"{arch}.attention.layer_norm_rms_epsilon", where, float)
    if not 0 <= eps < 1:
        raise PotionError(f"{where}: {arch}.attention.layer_norm_rms_epsilon = {eps} is not a small positive number")
    return ModelConfig(
        vocab_size=vocab,
        context_length=size("context_length"),
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=n_kv_head,
        n_embd=n_embd,
        head_dim=0 if head_dim * n_head == n_embd else head_dim,
        ffn_hidden=size("feed_forward_length"),
        dropout=0.0,
        bias=bias,
        qkv_bias=not bias and "blk.0.attn_q.bias" in tensors,
        tie_embeddings="output.weight" not in tensors,
        positions="rope",
        norm="rmsnorm",
        norm_eps=eps,
        qk_norm=arch == "qwen3",
        mlp_activation="swiglu",
        **rope_settings(reader, tensors.get(ROPE_FREQS), arch, head_dim, base, where),
    )


def positive(value: float, key: str, where: str) -> float:
    if not 0 < value < 1e12:  # NaN fails too
        raise PotionError(f"{where}: {key} = {value} is not a positive number")
    return value


def vocab_size(tensors: dict, stated: int, where: str) -> int:
    """The rows of the token embedding, which the metadata's vocab_size (where there is one) must agree with."""
    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        raise PotionError(f"{where} has no token_embd.weight tensor")
    rows = int(embedding.shape[-1])
    if not 1 <= rows <= llama.MAX_SIZE:
        raise PotionError(f"{where}: token_embd.weight has {rows:,} rows, not a plausible vocabulary")
    if stated and stated != rows:
        raise PotionError(f"{where}: its metadata says vocab_size {stated} but token_embd.weight has {rows} rows")
    return rows


def rope_settings(reader, freqs, arch: str, head_dim: int, base: float, where: str) -> dict:
    """rope_base, and Llama 3's rope scaling where the file's rope_freqs.weight holds exactly the divisors
    potion's llama3 rotation computes (llama.cpp stores the scaling only as those divisors)."""
    from gguf.quants import dequantize

    from potion.model.attention import llama3_frequencies

    kind = scalar(reader, f"{arch}.rope.scaling.type", where, str, "none")
    if kind != "none":
        raise PotionError(f"{where}: rope scaling {kind!r} is not supported (potion has none and Llama 3's)")
    settings = {"rope_base": base}
    if freqs is None:
        return settings
    if freqs.tensor_type.name not in ("F32", "F16") or [int(d) for d in freqs.shape] != [head_dim // 2]:
        raise PotionError(f"{where}: {ROPE_FREQS} must be {head_dim // 2} floats (one per rotary frequency)")
    divisors = torch.from_numpy(dequantize(freqs.data, freqs.tensor_type).astype(np.float32))
    if bool((divisors == 1).all()):
        return settings
    factor = float(divisors.max())
    original = scalar(reader, f"{arch}.rope.scaling.original_context_length", where, int, 8192)
    scaling = dict(
        rope_scaling="llama3",
        rope_scaling_factor=factor,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_context=original,
    )
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if factor < 1 or not 1 <= original <= llama.MAX_SIZE:
        raise PotionError(f"{where}: {ROPE_FREQS} holds divisors below 1, which no rope scaling potion has makes")
    expected = inv_freq / llama3_frequencies(inv_freq, ModelConfig(**scaling))
    if not torch.allclose(expected, divisors, rtol=1e-4, atol=0):
        raise PotionError(
            f"{where}: {ROPE_FREQS} is not Llama 3's rope scaling (factor {factor:g}, low 1, high 4, original "
            f"context {original}); potion cannot reproduce its rotary frequencies"
        )
    return {**settings, **scaling}


# ---------------------------------------------------------------- tensors


def gguf_names(config: ModelConfig) -> dict[str, str]:
    """{potion name: GGUF name} of every tensor the model holds."""
    names = {}
    for ours in llama.potion_shapes(config):
        parts = ours.split(".")
        if parts[0] == "blocks":
            names[ours] = f"blk.{parts[1]}.{BLOCK_NAMES['.'.join(parts[2:-1])]}.{parts[-1]}"
        else:
            names[ours] = f"{OUTSIDE_NAMES[parts[0]]}.{parts[-1]}"
    return names


def check_tensors(tensors: dict, config: ModelConfig, where: str) -> None:
    """Exactly the tensors the metadata implies, each of its shape (GGUF lists dimensions innermost first) and of
    a type potion dequantizes."""
    shapes = llama.potion_shapes(config)
    for ours, theirs in gguf_names(config).items():
        tensor = tensors.get(theirs)
        if tensor is None:
            raise PotionError(f"{where} has no {theirs} tensor, which its metadata implies")
        found, wanted = [int(d) for d in tensor.shape], list(reversed(shapes[ours]))
        if found != wanted:
            raise PotionError(f"{where}: {theirs} has shape {found}, its metadata implies {wanted}")
        if tensor.tensor_type.name not in TYPES:
            raise PotionError(
                f"{where}: {theirs} is stored as {tensor.tensor_type.name}; potion reads {', '.join(TYPES)}"
            )
    extra = sorted(set(tensors) - set(gguf_names(config).values()) - {ROPE_FREQS})
    if extra:
        raise PotionError(f"{where}: {extra[0]} is not part of the model its metadata describes")


def read_weights(tensors: dict, config: ModelConfig, permuted: bool) -> dict[str, torch.Tensor]:
    """potion-named float32 weights; permuted: the query and key rows are in llama.cpp's rotary order."""
    n_head, n_kv_head = config.n_head, config.n_kv_head or config.n_head
    weights = {}
    for ours, theirs in gguf_names(config).items():
        heads = None
        if permuted and ".attn.query." in ours:
            heads = n_head
        elif permuted and ".attn.key." in ours:
            heads = n_kv_head
        weights[ours] = dequantized(tensors[theirs], heads)
    return weights


def head_order(rows: int, heads: int) -> np.ndarray:
    """Which stored row each row of a query or key matrix comes from. llama.cpp's converter interleaves the two
    halves of every head (row h*D + i of the half-split layout potion and Hugging Face use is stored at
    h*D + 2*i for the first half, h*D + 2*i + 1 for the second)."""
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(0, 2, 1).reshape(-1)


def dequantized(tensor, heads: int | None) -> torch.Tensor:
    """One tensor as float32 in potion's (out, in) layout, dequantized a block of rows at a time into it; heads:
    undo the rotary interleaving over that many heads."""
    from gguf.quants import dequantize

    shape = tuple(reversed([int(d) for d in tensor.shape]))
    out = torch.empty(shape, dtype=torch.float32)
    data, values, kind = tensor.data, out.numpy(), tensor.tensor_type
    order = head_order(shape[0], heads) if heads else None
    if len(shape) == 1:
        values[:] = dequantize(data, kind) if order is None else dequantize(data, kind)[order]
        return out
    step = max(1, CHUNK // shape[1])
    for start in range(0, shape[0], step):
        rows = slice(start, min(start + step, shape[0]))
        values[rows] = dequantize(data[rows] if order is None else data[order[rows]], kind)
    return out


# ---------------------------------------------------------------- the tokenizer


def read_tokenizer(reader, where: str) -> BPETokenizer:
    model = scalar(reader, "tokenizer.ggml.model", where, str)
    pre = scalar(reader, "tokenizer.ggml.pre", where, str, "default")
    check_kind(model, pre, where)  # before reading arrays another kind of tokenizer may not have
    tokens = array(reader, "tokenizer.ggml.tokens", where, str)
    merges = array(reader, "tokenizer.ggml.merges", where, str)
    if "tokenizer.ggml.token_type" in reader.fields:
        token_types = array(reader, "tokenizer.ggml.token_type", where, int)
    else:
        token_types = [1] * len(tokens)  # all NORMAL
    default_eos = tokens.index(EOT) if EOT in tokens else MISSING
    eos = scalar(reader, "tokenizer.ggml.eos_token_id", where, int, default_eos)
    tokenizer = gguf_tokenizer(tokens, merges, token_types, eos, pre, where)
    tokenizer.chat_template = chat_template(reader, tokens, where)
    return tokenizer


def chat_template(reader, tokens: list[str], where: str) -> ChatTemplate | None:
    """The file's chat template, with the bos and eos tokens it may name."""
    source = scalar(reader, "tokenizer.chat_template", where, str, None)
    if not source:
        return None
    special = {}
    for name in ("bos", "eos", "unknown", "padding"):
        i = scalar(reader, f"tokenizer.ggml.{name}_token_id", where, int, None)
        if i is not None and 0 <= i < len(tokens):
            special[{"unknown": "unk", "padding": "pad"}.get(name, name) + "_token"] = tokens[i]
    return ChatTemplate(source, special)
