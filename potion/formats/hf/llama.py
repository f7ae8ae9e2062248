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

from dataclasses import replace
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from potion.config import ModelConfig
from potion.errors import PotionError
from potion.formats.hf.files import check_shapes, read_tensors

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


def potion_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{potion name: shape} of every tensor potion's GPT of this config stores (a tied head once, as the
    embedding), from the model built on the meta device: no memory.

    Built with learned positions in place of the rotary tables (which are computed, not stored), and with no
    random start: torch computes both on the meta device in Python code whose first call imports sympy (1 to 3 s
    and 80 MB of a load). No stored tensor's shape depends on either."""
    from potion.model import GPT

    with torch.device("meta"), NoInit():
        state = GPT(replace(config, positions="learned")).state_dict()
    unstored = {"head.weight"} if config.tie_embeddings else set()
    if config.positions != "learned":
        unstored.add("position_embedding.weight")
    return {name: tuple(t.shape) for name, t in state.items() if name not in unstored}


class NoInit(TorchFunctionMode):
    """Weights left as they are made: on the meta device there are no numbers to draw."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.nn.init.normal_, torch.Tensor.normal_):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def hf_name(name: str) -> str:
    """potion's tensor name -> the Hugging Face one: blocks.3.attn.query.weight is
    model.layers.3.self_attn.q_proj.weight."""
    module, kind = name.rsplit(".", 1)
    if module.startswith("blocks."):
        _, layer, inner = module.split(".", 2)
        return f"model.layers.{layer}.{BLOCK_NAMES[inner]}.{kind}"
    return f"{OUTSIDE_NAMES[module]}.{kind}"


def read_weights(folder: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """potion-named float32 tensors of the folder, checked against config.json before any is read."""
    shapes = potion_shapes(config)
    names = {ours: hf_name(ours) for ours in shapes}
    expected = {hf_name(ours): shape for ours, shape in shapes.items()}

    def check(found: dict[str, tuple[int, ...]]) -> None:
        stored = {name: shape for name, shape in found.items() if not ignored(name, config)}
        check_shapes(stored, expected, folder)

    tensors = read_tensors(folder, check)
    return {ours: tensors.pop(theirs).float() for ours, theirs in names.items()}


def ignored(name: str, config: ModelConfig) -> bool:
    """Stored tensors that are not weights: rotary tables some files keep, and a tied head saved beside its
    embedding."""
    return name.endswith("rotary_emb.inv_freq") or (config.tie_embeddings and name == "lm_head.weight")
