"""A Hugging Face GPT-2 folder read as a potion model: config.json, weights, tokenizer.

GPT-2 and potion's `gpt2` recipe compute the same function; only the layout differs. GPT-2 stores its linear
layers as Conv1D, whose weight is (in, out), the transpose of a Linear's; it fuses query, key and value into one
`c_attn` matrix, which potion keeps as three named ones; and its names differ (`h.0.ln_1` is `blocks.0.norm1`).

The folder is untrusted input: config.json is checked against the shapes in the weights file's header before
anything is allocated, and a pickled `pytorch_model.bin` is read with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from potion.config import ModelConfig
from potion.data.tokenizer import EOT, BPETokenizer
from potion.errors import PotionError
from potion.formats.hf.files import check_shapes, close_to, read_tensors

# GELU with the tanh approximation, which is what potion's MLP computes; plain "gelu" (erf) differs slightly
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default, which potion uses
BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal masks that older GPT-2 files store with the weights


def model_config(hf: dict, folder: Path) -> ModelConfig:
    where = f"'{folder / 'config.json'}'"
    if hf.get("model_type") != "gpt2":
        raise PotionError(
            f"{where} describes a {hf.get('model_type')!r} model; potion reads GPT-2 models (model_type gpt2)"
        )
    sizes = {key: hf.get(key, default) for key, default in (("vocab_size", 50257), ("n_positions", 1024))}
    sizes.update({key: hf.get(key) for key in ("n_embd", "n_layer", "n_head")})
    for key, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PotionError(f"{where}: {key} must be a positive integer, got {value!r}")
    inner = hf.get("n_inner") or 4 * sizes["n_embd"]
    if not isinstance(inner, int) or inner % sizes["n_embd"]:
        raise PotionError(f"{where}: n_inner ({inner!r}) must be a multiple of n_embd ({sizes['n_embd']})")
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new") in ACTIVATIONS, "gelu_new"),
        "layer_norm_epsilon": (close_to(hf.get("layer_norm_epsilon", LAYER_NORM_EPS), LAYER_NORM_EPS), "1e-5"),
        "scale_attn_weights": (hf.get("scale_attn_weights", True) is True, "true"),
        "scale_attn_by_inverse_layer_idx": (not hf.get("scale_attn_by_inverse_layer_idx", False), "false"),
        "add_cross_attention": (not hf.get("add_cross_attention", False), "false"),
    }
    for key, (supported, wanted) in unsupported.items():
        if not supported:
            raise PotionError(f"{where}: {key} = {hf[key]!r} is not supported (potion's GPT-2 has {wanted})")
    return ModelConfig(
        vocab_size=sizes["vocab_size"],
        context_length=sizes["n_positions"],
        n_layer=sizes["n_layer"],
        n_head=sizes["n_head"],
        n_embd=sizes["n_embd"],
        mlp_ratio=inner // sizes["n_embd"],
        dropout=0.0,
        bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        positions="learned",
        norm="layernorm",
        mlp_activation="gelu",
    )


# ---------------------------------------------------------------- weights


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a GPT-2 file of this config holds, by its GPT-2 name (Conv1D weights are (in, out))."""
    C, hidden = config.n_embd, config.mlp_ratio * config.n_embd
    shapes = {"wte.weight": (config.vocab_size, C), "wpe.weight": (config.context_length, C)}
    for i in range(config.n_layer):
        block = {
            "ln_1.weight": (C,),
            "ln_1.bias": (C,),
            "attn.c_attn.weight": (C, 3 * C),
            "attn.c_attn.bias": (3 * C,),
            "attn.c_proj.weight": (C, C),
            "attn.c_proj.bias": (C,),
            "ln_2.weight": (C,),
            "ln_2.bias": (C,),
            "mlp.c_fc.weight": (C, hidden),
            "mlp.c_fc.bias": (hidden,),
            "mlp.c_proj.weight": (hidden, C),
            "mlp.c_proj.bias": (C,),
        }
        shapes.update({f"h.{i}.{name}": shape for name, shape in block.items()})
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, C)
    return shapes


def gpt2_name(name: str) -> str:
    """GPT2LMHeadModel saves `transformer.h.0...`, GPT2Model saves `h.0...`: one spelling for both."""
    return name.removeprefix("transformer.")


def ignored(name: str, config: ModelConfig) -> bool:
    """Stored tensors that are not weights: causal-mask buffers, and a tied head saved beside its embedding."""
    return name.endswith(BUFFERS) or (config.tie_embeddings and name == "lm_head.weight")


def read_weights(folder: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The GPT-2-named tensors, after checking names and shapes against config.json (from the safetensors header
    alone where the file is safetensors, so a config that claims more than the file holds allocates nothing)."""
    tensors = read_tensors(folder, lambda found: check_gpt2_shapes(found, config, folder))
    return {gpt2_name(k): v.float() for k, v in tensors.items() if not ignored(gpt2_name(k), config)}


def check_gpt2_shapes(found: dict[str, tuple[int, ...]], config: ModelConfig, folder: Path) -> None:
    found = {gpt2_name(k): tuple(v) for k, v in found.items() if not ignored(gpt2_name(k), config)}
    check_shapes(found, expected_shapes(config), folder)


def to_potion(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2 names and Conv1D layouts -> potion's names and Linear layouts."""
    C = config.n_embd
    weights = {
        "token_embedding.weight": hf["wte.weight"],
        "position_embedding.weight": hf["wpe.weight"],
        "final_norm.weight": hf["ln_f.weight"],
        "final_norm.bias": hf["ln_f.bias"],
    }
    if not config.tie_embeddings:
        weights["head.weight"] = hf["lm_head.weight"]
    for i in range(config.n_layer):
        gpt2, ours = f"h.{i}.", f"blocks.{i}."
        query, key, value = hf[gpt2 + "attn.c_attn.weight"].t().split(C)  # (3C, C) -> three (C, C)
        query_bias, key_bias, value_bias = hf[gpt2 + "attn.c_attn.bias"].split(C)
        layers = {
            "norm1.weight": hf[gpt2 + "ln_1.weight"],
            "norm1.bias": hf[gpt2 + "ln_1.bias"],
            "attn.query.weight": query,
            "attn.query.bias": query_bias,
            "attn.key.weight": key,
            "attn.key.bias": key_bias,
            "attn.value.weight": value,
            "attn.value.bias": value_bias,
            "attn.proj.weight": hf[gpt2 + "attn.c_proj.weight"].t(),
            "attn.proj.bias": hf[gpt2 + "attn.c_proj.bias"],
            "norm2.weight": hf[gpt2 + "ln_2.weight"],
            "norm2.bias": hf[gpt2 + "ln_2.bias"],
            "mlp.up.weight": hf[gpt2 + "mlp.c_fc.weight"].t(),
            "mlp.up.bias": hf[gpt2 + "mlp.c_fc.bias"],
            "mlp.down.weight": hf[gpt2 + "mlp.c_proj.weight"].t(),
            "mlp.down.bias": hf[gpt2 + "mlp.c_proj.bias"],
        }
        weights.update({ours + name: t.contiguous() for name, t in layers.items()})
    return weights


# ---------------------------------------------------------------- tokenizer


def gpt2_tokenizer(vocab: Path, merges: Path) -> BPETokenizer:
    """GPT-2's byte-level BPE from its two files, as GPT2TokenizerFast builds it: no prefix space, and
    <|endoftext|> a special token (found whole in text, never split)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    try:
        tk = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as e:  # the library's own error types
        raise PotionError(f"'{vocab}' and '{merges}' are not a readable BPE vocabulary ({e})") from None
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    if tk.token_to_id(EOT) is None:
        raise PotionError(f"'{vocab}' has no {EOT} token")
    tk.add_special_tokens([AddedToken(EOT, special=True)])
    return BPETokenizer(tk)
