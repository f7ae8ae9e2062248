"""potion models as transformers architectures that compute the same function: names, layouts and config.json.

- the GPT-2 recipe (learned positions, LayerNorm, GELU) is GPT2LMHeadModel; biases potion leaves out are zeros.
- the modern recipe (rotary positions, RMSNorm, ReLU² or SwiGLU, any n_kv_head) is Qwen3ForCausalLM when queries
  and keys are normalised per head (Qwen3 does that before the rotation, as potion does), else LlamaForCausalLM.
  Both have a gated MLP, down(act(gate(x)) * up(x)): SwiGLU is that with act = SiLU; with act = ReLU and
  gate = up = potion's `up`, it is relu(z) * z = relu(z)², potion's non-gated ReLU² MLP exactly.
Anything else has no exact equivalent, and is refused with the field that stands in the way.
"""

from __future__ import annotations

import torch

from potion.config import ModelConfig
from potion.errors import PotionError
from potion.formats.hf.llama import hf_name
from potion.model.shapes import Shapes

RMS_NORM_EPS = 1e-6  # potion's RMSNorm, for the block norms and the query/key norms alike


def architecture(config: ModelConfig) -> str:
    """gpt2, qwen3 or llama: the transformers architecture that computes exactly what this model computes."""
    refuse = {
        "logit_softcap": config.logit_softcap > 0,
        "value_embeddings": config.value_embeddings,
    }
    if config.positions == "learned":
        name = "gpt2"
        wanted = {"norm": "layernorm", "mlp_activation": "gelu", "qk_norm": False}
        refuse["n_kv_head"] = config.n_kv_head not in (0, config.n_head)  # GPT-2 has one key/value head per head
    else:
        name = "qwen3" if config.qk_norm else "llama"
        wanted = {"norm": "rmsnorm"}
        refuse["mlp_activation"] = config.mlp_activation not in ("relu2", "swiglu")
        refuse["bias"] = config.qk_norm and config.bias  # Qwen3, the one with per-head q/k norms, has no MLP biases
    refuse_settings(config, refuse, wanted, "exact equivalent in a transformers architecture", "GPT-2, Llama, Qwen3")
    return name


def refuse_settings(config: ModelConfig, refuse: dict[str, bool], wanted: dict, target: str, names: str) -> None:
    """One line naming the first setting that is refused, or differs from what it is wanted to be."""
    refuse = {**refuse, **{field: getattr(config, field) != value for field, value in wanted.items()}}
    for field, refused in refuse.items():
        if refused:
            raise PotionError(
                f"model.{field} = {getattr(config, field)!r} has no {target} for a model with {config.positions} "
                f"positions ({names}); nothing was written"
            )


def hf_config(config: ModelConfig, name: str, eot_id: int) -> dict:
    shapes = Shapes.of(config)
    common = {"vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_embeddings, "dtype": "float32"}
    common.update(bos_token_id=eot_id, eos_token_id=eot_id)
    if name == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_positions": config.context_length,
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": shapes.ffn_hidden,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
            **common,
        }
    rope = {"rope_theta": config.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base}}
    return {
        "architectures": ["Qwen3ForCausalLM" if name == "qwen3" else "LlamaForCausalLM"],
        "model_type": name,
        "hidden_size": config.n_embd,
        "intermediate_size": shapes.ffn_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": shapes.n_kv_head,
        "head_dim": shapes.head_dim,
        "hidden_act": "silu" if shapes.gated else "relu",
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": RMS_NORM_EPS,
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "attention_dropout": config.dropout,
        "use_sliding_window": False,
        **rope,
        **common,
    }


def hf_weights(state: dict[str, torch.Tensor], config: ModelConfig, name: str) -> dict[str, torch.Tensor]:
    """potion's state dict (a tied head stored once) in the architecture's names and layouts."""
    weights = gpt2_weights(state, config) if name == "gpt2" else llama_weights(state, config)
    return {k: v.detach().float().contiguous().clone() for k, v in weights.items()}  # shared tensors: stored apart


def bias_of(state: dict, name: str, size: int) -> torch.Tensor:
    """A bias potion has, or zeros where it has none: adding zero changes nothing."""
    return state.get(name, torch.zeros(size))


def gpt2_weights(state: dict, config: ModelConfig) -> dict:
    C, hidden = config.n_embd, Shapes.of(config).ffn_hidden
    weights = {
        "transformer.wte.weight": state["token_embedding.weight"],
        "transformer.wpe.weight": state["position_embedding.weight"],
        "transformer.ln_f.weight": state["final_norm.weight"],
        "transformer.ln_f.bias": bias_of(state, "final_norm.bias", C),
    }
    for i in range(config.n_layer):
        ours, gpt2 = f"blocks.{i}.", f"transformer.h.{i}."
        qkv = [state[f"{ours}attn.{part}.weight"] for part in ("query", "key", "value")]
        qkv_bias = [bias_of(state, f"{ours}attn.{part}.bias", C) for part in ("query", "key", "value")]
        weights.update(
            {
                gpt2 + "ln_1.weight": state[ours + "norm1.weight"],
                gpt2 + "ln_1.bias": bias_of(state, ours + "norm1.bias", C),
                gpt2 + "attn.c_attn.weight": torch.cat(qkv).t(),  # Conv1D: (in, out)
                gpt2 + "attn.c_attn.bias": torch.cat(qkv_bias),
                gpt2 + "attn.c_proj.weight": state[ours + "attn.proj.weight"].t(),
                gpt2 + "attn.c_proj.bias": bias_of(state, ours + "attn.proj.bias", C),
                gpt2 + "ln_2.weight": state[ours + "norm2.weight"],
                gpt2 + "ln_2.bias": bias_of(state, ours + "norm2.bias", C),
                gpt2 + "mlp.c_fc.weight": state[ours + "mlp.up.weight"].t(),
                gpt2 + "mlp.c_fc.bias": bias_of(state, ours + "mlp.up.bias", hidden),
                gpt2 + "mlp.c_proj.weight": state[ours + "mlp.down.weight"].t(),
                gpt2 + "mlp.c_proj.bias": bias_of(state, ours + "mlp.down.bias", C),
            }
        )
    if not config.tie_embeddings:
        weights["lm_head.weight"] = state["head.weight"]
    return weights


def llama_weights(state: dict, config: ModelConfig) -> dict:
    """Llama and Qwen3 names (potion.formats.hf.llama.hf_name, the names potion reads them back by)."""
    weights = {
        hf_name(name): tensor for name, tensor in state.items() if name != "head.weight" or not config.tie_embeddings
    }
    if config.mlp_activation == "relu2":  # relu(gate(x)) * up(x) with gate = up is relu(z) * z = relu(z)²
        for name, tensor in state.items():
            if ".mlp.up." in name:
                weights[hf_name(name.replace(".mlp.up.", ".mlp.gate."))] = tensor
    return weights
