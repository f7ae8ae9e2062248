"""A Hugging Face Llama-family folder read as a potion model: LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM and Qwen3ForCausalLM are one architecture with a few knobs.

All four: RMSNorm, rotary positions (their own rope_theta; Llama 3's "llama3" rope scaling), grouped-query attention,
a SwiGLU feed-forward, a tied or untied head. Qwen2 adds biases to the query, key and value projections; Qwen3 drops
them and normalises queries and keys per head; Llama may have biases everywhere (attention_bias, mlp_bias).
Mistral's sliding window is exact for sequences no longer than the window, so the context is cut to it.

The folder is untrusted input: config.json is checked, then the weights' shapes against it (from the safetensors
headers alone), before anything is allocated.
"""

from __future__ import annotations

from pathlib import Path

import torch

from potion.config import ModelConfig
from potion.errors import PotionError
from potion.formats.hf.files import check_shapes, read_tensors
from potion.model.shapes import Shapes

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
MAX_SIZE = 1 << 24  # no dimension of a model potion can hold comes near this; a larger number is a damaged file
MAX_LAYERS = 1024
# potion's name -> the Hugging Face name, inside each block
BLOCK_NAMES = {
    "norm1": "input_layernorm",
    "norm2": "post_attention_layernorm",
    "attn.query": "self_attn.q_proj",
    "attn.key": "self_attn.k_proj",
    "attn.value": "self_attn.v_proj",
    "attn.proj": "self_attn.o_proj",
    "attn.q_norm": "self_attn.q_norm",
    "attn.k_norm": "self_attn.k_norm",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}
OUTSIDE_NAMES = {"token_embedding": "model.embed_tokens", "final_norm": "model.norm", "head": "lm_head"}


def model_config(hf: dict, folder: Path) -> ModelConfig:
    """config.json of a Llama-family model as potion's ModelConfig; anything potion would compute differently is
    refused with the key that stands in the way."""
    where = f"'{folder / 'config.json'}'"
    kind = hf.get("model_type")
    if kind not in MODEL_TYPES:
        raise PotionError(f"{where} describes a {kind!r} model; potion reads gpt2, {', '.join(MODEL_TYPES)}")
    sizes = sizes_of(hf, where)
    if hf.get("hidden_act", "silu") != "silu":
        raise PotionError(f"{where}: hidden_act = {hf['hidden_act']!r} is not supported (potion's SwiGLU uses silu)")
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise PotionError(f"{where}: attention_bias and mlp_bias differ; potion has biases on every layer or none")
    context = sizes["max_position_embeddings"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window", kind == "mistral") else None
    if isinstance(window, int) and not isinstance(window, bool) and 0 < window < context:
        context = window  # within its window, sliding-window attention is plain causal attention
    head_dim = sizes["head_dim"]
    return ModelConfig(
        vocab_size=sizes["vocab_size"],
        context_length=context,
        n_layer=sizes["num_hidden_layers"],
        n_head=sizes["num_attention_heads"],
        n_kv_head=sizes["num_key_value_heads"],
        n_embd=sizes["hidden_size"],
        head_dim=0 if head_dim * sizes["num_attention_heads"] == sizes["hidden_size"] else head_dim,
        ffn_hidden=sizes["intermediate_size"],
        dropout=0.0,
        bias=attention_bias,
        qkv_bias=kind == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        positions="rope",
        norm="rmsnorm",
        norm_eps=number(hf, "rms_norm_eps", 1e-6, where),
        qk_norm=kind == "qwen3",
        mlp_activation="swiglu",
        **rope_settings(hf, where),
    )


def sizes_of(hf: dict, where: str) -> dict[str, int]:
    sizes = {
        key: hf.get(key)
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    }
    sizes["max_position_embeddings"] = hf.get("max_position_embeddings", 2048)
    sizes["num_key_value_heads"] = hf.get("num_key_value_heads") or sizes["num_attention_heads"]
    for key, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SIZE:
            raise PotionError(f"{where}: {key} must be a positive integer below {MAX_SIZE:,}, got {value!r}")
    if sizes["num_hidden_layers"] > MAX_LAYERS:
        raise PotionError(f"{where}: num_hidden_layers = {sizes['num_hidden_layers']} is not a plausible model")
    heads = sizes["num_attention_heads"]
    sizes["head_dim"] = hf.get("head_dim") or sizes["hidden_size"] // heads
    if not isinstance(sizes["head_dim"], int) or not 1 <= sizes["head_dim"] <= MAX_SIZE:
        raise PotionError(f"{where}: head_dim must be a positive integer, got {sizes['head_dim']!r}")
    if heads % sizes["num_key_value_heads"]:
        raise PotionError(f"{where}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads")
    return sizes


def number(hf: dict, key: str, default: float, where: str) -> float:
    value = hf.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1e12:  # NaN fails too
        raise PotionError(f"{where}: {key} must be a non-negative number, got {value!r}")
    return float(value)


def rope_settings(hf: dict, where: str) -> dict:
    """rope_theta and rope scaling, from the older rope_scaling or the newer rope_parameters key."""
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(scaling, dict):
        raise PotionError(f"{where}: rope_scaling must be an object, got {scaling!r}")
    theta = scaling.get("rope_theta", hf.get("rope_theta", 10000.0))
    settings = {"rope_base": number({"rope_theta": theta}, "rope_theta", 10000.0, where)}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return settings
    if kind != "llama3":
        raise PotionError(f"{where}: rope scaling {kind!r} is not supported (potion has the default and llama3)")
    settings.update(
        rope_scaling="llama3",
        rope_scaling_factor=number(scaling, "factor", 8.0, where),
        rope_low_freq_factor=number(scaling, "low_freq_factor", 1.0, where),
        rope_high_freq_factor=number(scaling, "high_freq_factor", 4.0, where),
        rope_original_context=int(number(scaling, "original_max_position_embeddings", 8192, where)),
    )
    return settings


def potion_names(config: ModelConfig) -> dict[str, str]:
    """{potion name: Hugging Face name} of every tensor a Llama-family folder of this config holds."""
    names = {f"{ours}.weight": f"{theirs}.weight" for ours, theirs in OUTSIDE_NAMES.items()}
    if config.tie_embeddings:
        del names["head.weight"]
    shapes = Shapes.of(config)
    for i in range(config.n_layer):
        for ours, theirs in BLOCK_NAMES.items():
            if ours.startswith("attn.q_norm") or ours.startswith("attn.k_norm"):
                if not config.qk_norm:
                    continue
            names[f"blocks.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
            has_bias = shapes.qkv_bias if ours in ("attn.query", "attn.key", "attn.value") else shapes.bias
            if has_bias and not ours.startswith(("norm", "attn.q_norm", "attn.k_norm")):
                names[f"blocks.{i}.{ours}.bias"] = f"model.layers.{i}.{theirs}.bias"
    return names


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{Hugging Face name: shape}, from potion's own model built on the meta device (no memory)."""
    from potion.model import GPT

    with torch.device("meta"):
        state = GPT(config).state_dict()
    return {theirs: tuple(state[ours].shape) for ours, theirs in potion_names(config).items()}


def read_weights(folder: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """potion-named float32 tensors of the folder, checked against config.json before any is read."""
    expected = expected_shapes(config)

    def check(found: dict[str, tuple[int, ...]]) -> None:
        stored = {name: shape for name, shape in found.items() if not ignored(name, config)}
        check_shapes(stored, expected, folder)

    tensors = read_tensors(folder, check)
    return {ours: tensors.pop(theirs).float() for ours, theirs in potion_names(config).items()}


def ignored(name: str, config: ModelConfig) -> bool:
    """Stored tensors that are not weights: rotary tables some files keep, and a tied head saved beside its
    embedding."""
    return name.endswith("rotary_emb.inv_freq") or (config.tie_embeddings and name == "lm_head.weight")
