"""Masked self-attention: each token's query against the keys of itself and the tokens before it.

Shapes: B = batch, T = time (tokens), C = n_embd, H = n_head query heads, H_kv = n_kv_head key/value heads,
D = head_dim. With H_kv < H (grouped-query attention) each key/value head serves H / H_kv query heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from potion.config import ModelConfig
from potion.kernels.attention import attention_steps, cached_attention, causal_attention
from potion.kernels.dropout import dropout
from potion.kernels.norms import rms_norm
from potion.model.cache import LayerCache
from potion.model.shapes import Shapes


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (context_length, head_dim / 2)."""
    head_dim = Shapes.of(config).head_dim
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if config.rope_scaling == "llama3":
        inv_freq = llama3_frequencies(inv_freq, config)
    angles = torch.outer(torch.arange(config.context_length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def llama3_frequencies(inv_freq: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Llama 3's longer context: rotations slower than the original context's span are slowed by the factor,
    faster ones kept, and the band between blended smoothly."""
    wavelength = 2 * math.pi / inv_freq
    long_wave = config.rope_original_context / config.rope_low_freq_factor
    short_wave = config.rope_original_context / config.rope_high_freq_factor
    blend = (config.rope_original_context / wavelength - config.rope_low_freq_factor) / (
        config.rope_high_freq_factor - config.rope_low_freq_factor
    )
    blended = (1 - blend) * inv_freq / config.rope_scaling_factor + blend * inv_freq
    slowed = torch.where(wavelength > long_wave, inv_freq / config.rope_scaling_factor, inv_freq)
    between = (wavelength >= short_wave) & (wavelength <= long_wave)
    return torch.where(between, blended, slowed)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) of each head vector by a position-dependent angle. x: (B, T, H, D).

    In x's own precision: a bf16 rotation rounds no more than the bf16 query it rotates."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[None, :, None].to(x.dtype), sin[None, :, None].to(x.dtype)  # (1, T, 1, D/2)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    """Causal self-attention with named query, key and value projections.

    While `record` is a dict, the next forward passes compute attention step by step (the reference in
    potion.kernels.attention) and leave every piece in it: queries, keys, values, scores, weights, context vectors.
    That is how explain looks inside; the forward pass takes no argument for it.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        shapes = Shapes.of(config)
        self.n_head, self.n_kv_head, self.head_dim = shapes.n_head, shapes.n_kv_head, shapes.head_dim
        self.widths = (shapes.q_dim, shapes.kv_dim, shapes.kv_dim)
        C = config.n_embd
        self.query = nn.Linear(C, shapes.q_dim, bias=shapes.qkv_bias)  # what each token looks for
        self.key = nn.Linear(C, shapes.kv_dim, bias=shapes.qkv_bias)  # what each token offers
        self.value = nn.Linear(C, shapes.kv_dim, bias=shapes.qkv_bias)  # what each token passes on
        self.proj = nn.Linear(shapes.q_dim, C, bias=config.bias)  # mixes the heads' context vectors
        self.fused_qkv: nn.Linear | None = None  # see fuse_projections
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.head_dim, shapes.norm_eps), RMSNorm(self.head_dim, shapes.norm_eps)
        self.dropout = config.dropout
        self.record: dict | None = None

    def fuse_projections(self) -> None:
        """Replace query, key and value by one Linear that computes all three side by side: for generation's
        decoding copies, one product and one call where there were three. Training, checkpoints and explain keep
        the three named ones."""
        with torch.no_grad():
            weight, bias = self.side_by_side()
        fused = nn.Linear(self.query.in_features, weight.size(0), bias=bias is not None, device="meta")
        fused.weight = nn.Parameter(weight)
        if bias is not None:
            fused.bias = nn.Parameter(bias)
        self.fused_qkv = fused
        del self.query, self.key, self.value

    def side_by_side(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The query, key and value weights (H*D + 2*H_kv*D, C) and biases stacked, in that order."""
        parts = (self.query, self.key, self.value)
        bias = torch.cat([p.bias for p in parts]) if parts[0].bias is not None else None
        return torch.cat([p.weight for p in parts]), bias

    def projections(self, x):
        """Query (B, T, H*D), key and value (B, T, H_kv*D) of x (B, T, C).

        While training, one product against the three weights side by side: one call forward and one for each
        gradient, where three named products made nine."""
        if self.fused_qkv is not None:
            return self.fused_qkv(x).split(self.widths, dim=-1)
        if not self.training:
            return self.query(x), self.key(x), self.value(x)
        return F.linear(x, *self.side_by_side()).split(self.widths, dim=-1)

    def forward(self, x, rope=None, cache: LayerCache | None = None, start: int = 0, value_embedding=None):
        B, T, C = x.shape
        q, k, v = self.projections(x)
        if value_embedding is not None:
            v = v + value_embedding
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, H, D): norms and rotations run on this layout
        k, v = k.view(B, T, self.n_kv_head, self.head_dim), v.view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, H_kv, T, D)
        if cache is not None:  # write this step's keys/values, then attend over everything so far
            cache.key[:B, :, start : start + T] = k
            cache.value[:B, :, start : start + T] = v
            k, v = cache.key[:B, :, : start + T], cache.value[:B, :, : start + T]

        if self.record is not None:
            self.record.update(attention_steps(q, k, v, start))
            y = self.record["context"]
        elif start == 0:
            y = causal_attention(q, k, v, self.dropout if self.training else 0.0)  # (B, H, T, D)
        else:
            y = cached_attention(q, k, v, start)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)  # heads side by side again
        return dropout(self.proj(y), self.dropout, self.training)


def fuse_projections(model: nn.Module) -> None:
    """One product for the query, key and value of every attention layer in model (Attention.fuse_projections)."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.fuse_projections()
