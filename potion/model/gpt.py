"""The GPT: token embedding + positions, a stack of blocks, a final norm and a linear head.

Each block is the two steps of the potion metaphor:
  1. masked self-attention (attention.py): every token's query is compared with the keys of itself and the tokens
     before it, the scaled scores are softmaxed into attention weights (each row sums to 1), and the weighted sum
     of the values is the token's context vector;
  2. the feed-forward network (the "thinking step");
each wrapped in a residual link: x = x + step(norm(x)).

Shapes: B = batch, T = time (tokens), C = n_embd, F = feed-forward width, V = vocab_size.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from potion.config import ModelConfig
from potion.kernels.activations import gelu_tanh, relu_squared, swiglu
from potion.kernels.dropout import dropout
from potion.model.attention import Attention, RMSNorm, rope_tables
from potion.model.cache import KVCache
from potion.model.shapes import Shapes


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    eps = Shapes.of(config).norm_eps
    if config.norm == "rmsnorm":
        return RMSNorm(dim, eps)
    return nn.LayerNorm(dim, eps=eps, bias=config.bias)


def in_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in autocast's precision (bf16) when autocast is on: cast once here rather than by each of the layers that
    read it (query, key and value would each make their own copy)."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


class MLP(nn.Module):
    """The feed-forward "thinking step": widen, a non-linearity, project back. With swiglu, a second widening
    (the gate) decides how much of each hidden unit passes: silu(gate(x)) * up(x)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = Shapes.of(config).ffn_hidden
        self.activation = config.mlp_activation
        if self.activation == "swiglu":
            self.gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.up = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x):
        h = self.up(x)  # (B, T, F)
        if self.activation == "swiglu":
            h = swiglu(self.gate(x), h)
        else:
            h = gelu_tanh(h) if self.activation == "gelu" else relu_squared(h)
        return dropout(self.down(h), self.dropout, self.training)  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(config, config.n_embd)
        self.attn = Attention(config)
        self.norm2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, start=0, value_embedding=None):
        x = x + self.attn(in_compute_dtype(self.norm1(x)), rope, cache, start, value_embedding)  # residual link
        return x + self.mlp(self.norm2(x))  # residual link around the feed-forward step


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, init: bool = True):
        super().__init__()
        self.config = config
        self.shapes = Shapes.of(config)
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        if config.positions == "learned":
            self.position_embedding = nn.Embedding(config.context_length, config.n_embd)
        else:
            self.register_rope_tables()
        if config.value_embeddings:  # a token's identity fed straight into what it passes on, in every layer
            self.value_embedding = nn.Embedding(config.vocab_size, self.shapes.kv_dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_norm = make_norm(config, config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.token_embedding.weight
        if init:  # GPT-2's initialisation; without_weights skips it
            self.reset_parameters()

    @classmethod
    def without_weights(cls, config: ModelConfig) -> "GPT":
        """A GPT whose parameters have no storage yet (the meta device), for weights about to be loaded in place
        (potion.train.checkpoint.load_model_state): no random numbers drawn only to be overwritten, and no second
        copy of the weights."""
        with torch.device("meta"):
            model = cls(config, init=False)  # drawing on the meta device imports sympy: a second of the load
        if config.positions == "rope":
            model.register_rope_tables()  # computed, not loaded: made on the CPU
        return model

    def tie_head(self) -> None:
        """The output head reads the token embedding's matrix (after that matrix was replaced by a loaded one)."""
        if self.config.tie_embeddings:
            self.head.weight = self.token_embedding.weight

    def register_rope_tables(self) -> None:
        cos, sin = rope_tables(self.config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def reset_parameters(self):
        """GPT-2 initialisation: N(0, 0.02), with residual projections scaled by 1/sqrt(2 * n_layer)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith("attn.proj") or name.endswith("mlp.down")
                if is_residual and self.config.zero_init_proj:
                    nn.init.zeros_(module.weight)
                else:
                    nn.init.normal_(module.weight, std=residual_std if is_residual else 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        if self.config.zero_init_head:
            nn.init.zeros_(self.head.weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied head's matrix is counted once

    def training_flops_per_token(self) -> int:
        return self.shapes.training_flops_per_token(self.config.qk_norm)

    def forward(self, idx, targets=None, cache: KVCache | None = None, *, last_only: bool = False):
        """idx: (B, T) token ids. Returns logits (B, T, V), and the mean cross-entropy if targets are given.

        With a cache, idx continues the cached sequence. last_only=True reads out only the last position, logits
        (B, 1, V): all that generation needs, without the output layer's work for the other positions.
        """
        assert not (last_only and targets is not None), "the loss needs every position's logits"
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.context_length:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context length {self.config.context_length}")
        x = self.token_embedding(idx)  # (B, T, C)
        rope = None
        if self.config.positions == "learned":
            x = x + self.position_embedding(torch.arange(start, start + T, device=idx.device))
        else:
            rope = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])
        x = dropout(x, self.config.dropout, self.training)
        value_embedding = self.value_embedding(idx) if self.config.value_embeddings else None
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache.layers[i] if cache is not None else None, start, value_embedding)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        logits = self.readout(x)  # (B, T, V), or (B, 1, V) with last_only
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """Residual stream (..., C) -> next-token logits (..., V): final norm, output layer, optional soft-cap."""
        logits = self.head(self.final_norm(x))
        if self.config.logit_softcap > 0:
            logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)
        return logits

    def new_cache(self, batch_size: int = 1, length: int | None = None) -> KVCache:
        p = next(self.parameters())
        return KVCache.empty(self.config, batch_size, p.device, p.dtype, length)
