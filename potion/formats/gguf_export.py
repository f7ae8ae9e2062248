"""`potion export --format gguf`: a potion model as one GGUF file, the format llama.cpp runs (and so ollama and
LM Studio).

llama.cpp builds each architecture's computation itself; the file names the architecture and gives its numbers,
tensors and vocabulary. So a model is written only where one of llama.cpp's architectures computes exactly what
potion's model computes, and everything else is refused before anything is written:

- the modern recipe (rotary positions, RMSNorm, any n_kv_head, no biases) is "llama" with SwiGLU, and "arcee"
  (Llama's layout with a non-gated ReLU² feed-forward, down(relu(up(x))²)) with ReLU²;
- the GPT-2 recipe (learned positions, LayerNorm, GELU, one key/value head per head) is "gpt2"; biases potion
  leaves out are written as zeros, which llama.cpp's gpt2 requires and adding changes nothing.

llama.cpp rotates each query and key head as neighbouring pairs (x0, x1), (x2, x3), ... where potion, like
Hugging Face, pairs the two halves (x_i, x_{i+D/2}); the rows of those weights are reordered to match, as
llama.cpp's own converter does for Hugging Face's Llama. The vocabulary goes in as the byte-level BPE llama.cpp
calls "gpt2", character vocabularies included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from potion.config import ModelConfig
from potion.data.tokenizer import BPETokenizer, CharTokenizer, Tokenizer
from potion.errors import PotionError, require
from potion.formats.fileio import atomic_write
from potion.formats.gguf import gguf_names
from potion.formats.hf.layouts import refuse_settings
from potion.formats.run import load
from potion.model.attention import llama3_frequencies
from potion.model.shapes import Shapes
from potion.train.checkpoint import model_state

DTYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}  # -> gguf.LlamaFileType
MATRIX_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}  # -> gguf.GGMLQuantizationType
GPT2_PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's split (tokenizers' ByteLevel with use_regex)
# llama.cpp needs a merges list, and gguf writes no empty array: a vocabulary with nothing to merge gets this one,
# which never applies (the byte 0xFF twice, in the byte-level alphabet; no UTF-8 text holds the byte 0xFF)
NEVER_MERGED = "ÿ ÿ"


def export_gguf(source: str | Path | None, out: str | Path, dtype: str = "f16") -> tuple[Path, str]:
    """Write one GGUF file for a potion run (or any model potion loads); returns it and its architecture.

    The architecture and the vocabulary are checked before anything is written, and `out` is never overwritten.
    """
    gguf = require("gguf", "gguf", "--format gguf")
    out = Path(out)
    if dtype not in DTYPES:
        raise PotionError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.exists():
        raise PotionError(f"'{out}' already exists; choose another --out or remove it")
    run = load(source)
    config = run.config.model
    arch = architecture(config)
    vocab = gguf_vocab(run.tokenizer, config.vocab_size)
    tensors = gguf_tensors(model_state(run.model), config, arch)
    matrix_type = getattr(gguf.GGMLQuantizationType, MATRIX_TYPES[dtype])

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            writer.add_name(run.run_dir.name)
            writer.add_file_type(getattr(gguf.LlamaFileType, DTYPES[dtype]))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            add_hyperparameters(writer, config, arch)
            template = run.tokenizer.chat_template
            add_vocab(writer, vocab, template.source if template is not None else None)
            for name, tensor in tensors.items():
                data, kind = encoded(gguf, name, tensor, matrix_type)
                writer.add_tensor(name, data, raw_dtype=kind)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    atomic_write(out, write)
    return out, arch


# ---------------------------------------------------------------- the architecture


def architecture(config: ModelConfig) -> str:
    """llama, arcee or gpt2: the llama.cpp architecture that computes exactly what this model computes."""
    shapes = Shapes.of(config)
    refuse = {
        "logit_softcap": config.logit_softcap > 0,
        "value_embeddings": config.value_embeddings,
        "qk_norm": config.qk_norm,
    }
    if config.positions == "learned":
        name = "gpt2"
        wanted = {"norm": "layernorm", "mlp_activation": "gelu"}
        refuse["n_kv_head"] = shapes.n_kv_head != shapes.n_head  # llama.cpp's gpt2 has one key/value head per head
        refuse["head_dim"] = shapes.q_dim != config.n_embd  # and heads exactly n_embd wide together
    else:
        name = "arcee" if config.mlp_activation == "relu2" else "llama"
        wanted = {"norm": "rmsnorm", "bias": False, "qkv_bias": False}
        refuse["mlp_activation"] = config.mlp_activation not in ("relu2", "swiglu")
    refuse_settings(config, refuse, wanted, "equivalent in llama.cpp's architectures", "llama, arcee, gpt2")
    return name


def add_hyperparameters(writer, config: ModelConfig, arch: str) -> None:
    shapes = Shapes.of(config)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(shapes.ffn_hidden)
    writer.add_head_count(shapes.n_head)
    writer.add_head_count_kv(shapes.n_kv_head)
    if arch == "gpt2":
        writer.add_layer_norm_eps(shapes.norm_eps)
        return
    writer.add_vocab_size(config.vocab_size)
    writer.add_key_length(shapes.head_dim)  # heads may be wider or narrower than n_embd / n_head
    writer.add_value_length(shapes.head_dim)
    writer.add_rope_dimension_count(shapes.head_dim)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_layer_norm_rms_eps(shapes.norm_eps)


# ---------------------------------------------------------------- the tensors


def gguf_tensors(state: dict[str, torch.Tensor], config: ModelConfig, arch: str) -> dict[str, np.ndarray]:
    """potion's weights under llama.cpp's names, as float32 arrays (out_features, in_features), as GGUF stores
    them."""
    weights = gpt2_tensors(state, config) if arch == "gpt2" else llama_tensors(state, config)
    return {name: t.detach().float().contiguous().numpy() for name, t in weights.items()}


def llama_tensors(state: dict, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The llama (and arcee) tensors under the names potion's reader maps back (potion.formats.gguf.gguf_names),
    queries and keys in llama.cpp's rotary order."""
    shapes, names = Shapes.of(config), gguf_names(config)
    tensors = {gguf_name: state[ours] for ours, gguf_name in names.items()}
    for i in range(config.n_layer):
        for part, heads in (("query", shapes.n_head), ("key", shapes.n_kv_head)):
            name = names[f"blocks.{i}.attn.{part}.weight"]
            tensors[name] = interleaved(tensors[name], heads)
    if config.rope_scaling == "llama3":
        tensors["rope_freqs.weight"] = rope_divisors(config)
    return tensors


def interleaved(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """A query or key weight (n_head * D, C) with each head's rows from potion's halves order (the pair i is rows
    i and i + D/2) to llama.cpp's neighbours order (the pair i is rows 2i and 2i + 1)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def rope_divisors(config: ModelConfig) -> torch.Tensor:
    """Llama 3's slowed rotations as llama.cpp applies them: each frequency divided by a factor (D/2,)."""
    head_dim = Shapes.of(config).head_dim
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return inv_freq / llama3_frequencies(inv_freq, config)


def gpt2_tensors(state: dict, config: ModelConfig) -> dict[str, torch.Tensor]:
    C, F = config.n_embd, Shapes.of(config).ffn_hidden

    def bias(name: str, size: int) -> torch.Tensor:
        return state.get(name, torch.zeros(size))

    tensors = {
        "token_embd.weight": state["token_embedding.weight"],
        "position_embd.weight": state["position_embedding.weight"],
        "output_norm.weight": state["final_norm.weight"],
        "output_norm.bias": bias("final_norm.bias", C),
    }
    if not config.tie_embeddings:
        tensors["output.weight"] = state["head.weight"]
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"blk.{i}."
        parts = ("query", "key", "value")
        tensors.update(
            {
                theirs + "attn_norm.weight": state[ours + "norm1.weight"],
                theirs + "attn_norm.bias": bias(ours + "norm1.bias", C),
                theirs + "attn_qkv.weight": torch.cat([state[f"{ours}attn.{p}.weight"] for p in parts]),
                theirs + "attn_qkv.bias": torch.cat([bias(f"{ours}attn.{p}.bias", C) for p in parts]),
                theirs + "attn_output.weight": state[ours + "attn.proj.weight"],
                theirs + "attn_output.bias": bias(ours + "attn.proj.bias", C),
                theirs + "ffn_norm.weight": state[ours + "norm2.weight"],
                theirs + "ffn_norm.bias": bias(ours + "norm2.bias", C),
                theirs + "ffn_up.weight": state[ours + "mlp.up.weight"],
                theirs + "ffn_up.bias": bias(ours + "mlp.up.bias", F),
                theirs + "ffn_down.weight": state[ours + "mlp.down.weight"],
                theirs + "ffn_down.bias": bias(ours + "mlp.down.bias", C),
            }
        )
    return tensors


def encoded(gguf, name: str, tensor: np.ndarray, matrix_type):
    """The tensor's bytes and type. Norms, biases, the rope divisors and the position embedding stay float32, as
    llama.cpp's converter keeps them; a matrix whose rows do not fill whole q8_0 blocks (32 numbers) is f16."""
    kind = matrix_type
    if tensor.ndim == 1 or name.endswith("_norm.weight") or name == "position_embd.weight":
        kind = gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(tensor, kind), kind
    except gguf.QuantError:
        kind = gguf.GGMLQuantizationType.F16
        return gguf.quants.quantize(tensor, kind), kind


# ---------------------------------------------------------------- the vocabulary


@dataclass(frozen=True)
class GGUFVocab:
    """A byte-level BPE as llama.cpp reads it: the tokens by id, their types, the merges in rank order."""

    tokens: list[str]
    types: list[int]  # gguf.TokenType: 1 normal, 3 control, 4 user-defined, 5 unused
    merges: list[str]  # "left right"
    eos_id: int


NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def gguf_vocab(tokenizer: Tokenizer, rows: int) -> GGUFVocab:
    """The tokenizer as a byte-level BPE that gives llama.cpp the same ids for the same text; rows: the token
    embedding's, which llama.cpp needs to be the number of tokens (rows past the tokenizer's are unused)."""
    vocab = char_vocab(tokenizer) if isinstance(tokenizer, CharTokenizer) else bpe_vocab(tokenizer)
    if len(vocab.tokens) > rows:
        raise PotionError(f"the tokenizer has {len(vocab.tokens)} tokens but the model only {rows}")
    padding = range(len(vocab.tokens), rows)
    tokens, types = vocab.tokens + [f"[PAD{i}]" for i in padding], vocab.types + [UNUSED] * len(padding)
    return GGUFVocab(tokens, types, vocab.merges or [NEVER_MERGED], vocab.eos_id)


def char_vocab(tokenizer: CharTokenizer) -> GGUFVocab:
    """One token per character, spelled as its UTF-8 bytes in the byte-level alphabet. A character of several
    bytes is joined by merges that extend its first byte one byte at a time; every merge's right side is a
    continuation byte (0b10xxxxxx) and its left side starts a character, so no merge ever joins two characters,
    and every character comes out whole as its own token."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokens, merges = [], {}
    for char in tokenizer.chars:
        spelled = "".join(piece for piece, _ in byte_level.pre_tokenize_str(char))
        tokens.append(spelled)
        for end in range(1, len(spelled)):
            merges.setdefault(f"{spelled[:end]} {spelled[end]}", None)
    types = [NORMAL] * len(tokens) + [CONTROL]
    return GGUFVocab(tokens + ["<|endoftext|>"], types, list(merges), tokenizer.eot_id)


def bpe_vocab(tokenizer: BPETokenizer) -> GGUFVocab:
    """A `tokenizers` byte-level BPE with GPT-2's split, as its vocabulary, types and merges."""
    spec = json.loads(tokenizer.tk.to_str())
    check_gpt2_bpe(spec)
    by_id = {i: token for token, i in tokenizer.tk.get_vocab(with_added_tokens=True).items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise PotionError("the tokenizer's ids have gaps; llama.cpp numbers its tokens 0, 1, 2, ...")
    added = tokenizer.tk.get_added_tokens_decoder()
    types = [NORMAL] * len(by_id)
    for i, token in added.items():
        types[i] = CONTROL if token.special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return GGUFVocab([by_id[i] for i in range(len(by_id))], types, merges, tokenizer.eot_id)


def check_gpt2_bpe(spec: dict) -> None:
    """Refuse a tokenizer that llama.cpp's "gpt2" BPE with GPT-2's split would not reproduce id for id."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    differences = {
        "model": model.get("type") != "BPE",
        "normalizer": spec.get("normalizer") is not None,
        "pre-tokenizer": (pre.get("type"), pre.get("add_prefix_space"), pre.get("use_regex", True))
        != ("ByteLevel", False, True),
        "decoder": (spec.get("decoder") or {}).get("type") != "ByteLevel",
    }
    for option in ("byte_fallback", "ignore_merges", "dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        differences[f"model.{option}"] = model.get(option) not in (None, False, "")
    for part, differs in differences.items():
        if differs:
            raise PotionError(
                f"the tokenizer's {part} is not GPT-2's byte-level BPE (ByteLevel, add_prefix_space = false), the "
                "one potion writes to GGUF so far; nothing was written"
            )


def add_vocab(writer, vocab: GGUFVocab, chat_template: str | None) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(GPT2_PRE_TOKENIZER)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.eos_id)  # potion's one end token also separates documents
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_add_bos_token(False)  # potion encodes a prompt as its text alone
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
