"""LoRA: low-rank adapters beside a model's frozen projections, so that a fine-tune trains a few parameters.

A projection W (out, in) stays frozen and gains two small matrices: A (r, in), drawn as peft draws it
(Kaiming-uniform, as nn.Linear's own weights), and B (out, r), zeros. The adapted projection computes

    y = W x + (alpha / r) * B A dropout(x)

so at the start (B = 0) the adapted model is the base model exactly, and training moves A and B alone. Merging
writes W + (alpha / r) B A into the weights: a plain GPT again, with the same logits up to float rounding.

The names follow peft's: blocks.3.attn.query becomes blocks.3.attn.query.base_layer (the frozen Linear),
.lora_A and .lora_B. Training computes the query, key and value of each token in one product of their weights
side by side (Attention.projections); an attention with adapters on any of the three gets an AdaptedProjections
in its fused_qkv place, which keeps that one product for the frozen weights and adds each adapter's part.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from potion.config.configs import LORA_TARGETS, ModelConfig
from potion.kernels.dropout import dropout
from potion.model.attention import Attention

# train.lora_targets' names -> the projection inside each block
PROJECTIONS = {
    "q": "attn.query",
    "k": "attn.key",
    "v": "attn.value",
    "o": "attn.proj",
    "gate": "mlp.gate",
    "up": "mlp.up",
    "down": "mlp.down",
}
assert tuple(PROJECTIONS) == LORA_TARGETS


class LoRALinear(nn.Module):
    """A frozen Linear and its adapter: base_layer(x) + scale * lora_B(lora_A(dropout(x)))."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout_p: float = 0.0):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **like)  # (r, in)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **like)  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the adapted model starts as the base model
        self.scale = alpha / rank
        self.dropout = dropout_p

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's part of the output, (..., out)."""
        return self.lora_B(self.lora_A(dropout(x, self.dropout, self.training))) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.delta(x)

    @property
    def weight(self) -> torch.Tensor:
        """W + scale * B A: the weight of the one Linear this computes (what code that reads a projection's weight,
        such as explain's per-head attribution or generation's fused decoding copy, gets)."""
        return self.base_layer.weight + (self.lora_B.weight @ self.lora_A.weight) * self.scale

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias


class AdaptedProjections(nn.Module):
    """Query, key and value of x side by side (B, T, H*D + 2*H_kv*D), as Attention's fused_qkv: while training,
    one product against the three frozen weights side by side plus each adapter's low-rank part."""

    def __init__(self, attention: Attention):
        super().__init__()
        self.parts = (attention.query, attention.key, attention.value)  # a tuple: the attention owns and names them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return torch.cat([part(x) for part in self.parts], dim=-1)
        bases = [base_of(part) for part in self.parts]
        bias = torch.cat([b.bias for b in bases]) if bases[0].bias is not None else None
        frozen = F.linear(x, torch.cat([b.weight for b in bases]), bias)  # one product for the three
        pieces = frozen.split([b.out_features for b in bases], dim=-1)
        adapted = [p + part.delta(x) if isinstance(part, LoRALinear) else p for p, part in zip(pieces, self.parts)]
        return torch.cat(adapted, dim=-1)


def base_of(module: nn.Module) -> nn.Linear:
    return module.base_layer if isinstance(module, LoRALinear) else module


def available_targets(config: ModelConfig) -> tuple[str, ...]:
    """The projections this model has: a gate only with swiglu."""
    return tuple(name for name in LORA_TARGETS if name != "gate" or config.mlp_activation == "swiglu")


def chosen_targets(targets: str, config: ModelConfig) -> tuple[str, ...]:
    """train.lora_targets as a tuple of names ("all": every projection this model has)."""
    return available_targets(config) if targets == "all" else tuple(targets.split(","))


def add_adapters(model: nn.Module, targets: str, rank: int, alpha: float, dropout_p: float = 0.0) -> None:
    """Freeze every weight of a GPT and put an adapter on the chosen projections of every block, in place."""
    names = chosen_targets(targets, model.config)
    assert rank > 0 and set(names) <= set(available_targets(model.config)), (targets, rank)
    model.requires_grad_(False)
    for block in model.blocks:
        for name in names:
            owner, attribute = PROJECTIONS[name].split(".")
            parent = getattr(block, owner)
            setattr(parent, attribute, LoRALinear(getattr(parent, attribute), rank, alpha, dropout_p))
        if any(isinstance(part, LoRALinear) for part in (block.attn.query, block.attn.key, block.attn.value)):
            block.attn.fused_qkv = AdaptedProjections(block.attn)


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights by name (blocks.0.attn.query.lora_A.weight, ...): all that a LoRA fine-tune trains."""
    return {name: tensor for name, tensor in model.state_dict().items() if is_adapter(name)}


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of a GPT as a plain GPT holds them, each adapter merged into its projection's weight (a model
    without adapters: its own state dict)."""
    state = {name.replace(".base_layer.", "."): t for name, t in model.state_dict().items() if not is_adapter(name)}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):
                state[f"{name}.weight"] = module.weight
    return state


def merge_adapters(model: nn.Module) -> None:
    """Write each adapter into its projection's weight and put a plain Linear back in its place, in place: the
    model is a plain GPT again (the merged weights are trainable again, as a plain GPT's are)."""
    for block in model.blocks:
        if isinstance(block.attn.fused_qkv, AdaptedProjections):
            block.attn.fused_qkv = None
        for owner in (block.attn, block.mlp):
            for attribute, child in list(owner.named_children()):
                if isinstance(child, LoRALinear):
                    setattr(owner, attribute, merged_linear(child))
    model.requires_grad_(True)


def merged_linear(adapted: LoRALinear) -> nn.Linear:
    base = adapted.base_layer
    with torch.no_grad():
        base.weight.copy_(adapted.weight)
    return base


def training_flops_per_token(model: nn.Module) -> int:
    """A LoRA step's FLOPs per token: each frozen weight 4 (forward, and back to its input: no gradient of its
    own, where a trained weight takes 6), each adapter weight 6, and attention's products as before."""
    shapes, config = model.shapes, model.config
    multiplied = shapes.n_layer * shapes.block_parameters(config.qk_norm) + config.vocab_size * config.n_embd
    adapters = sum(tensor.numel() for tensor in adapter_state(model).values())
    return model.training_flops_per_token() - 2 * multiplied + 6 * adapters
