"""Causal attention: softmax(q.k / sqrt(D)) . v over each token and the ones before it.

Shapes: q (B, H, T, D); k and v (B, H_kv, T_k, D), where H is a multiple of H_kv (grouped-query attention: each
key/value head serves H / H_kv query heads, and is never copied to do so). T_k >= T: with a KV cache, the queries
are the last T of the T_k positions.

attention_steps is the reference: every step written out, which explain records. The others are the fast paths and
must equal it (tests/test_kernels.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from potion.kernels.dropout import keep_mask

# Queries per block in attention_with_dropout (docs/benchmarks.md, "Attention with dropout in blocks of queries")
ATTENTION_ROWS = 128


def attention_steps(q, k, v, start: int = 0) -> dict[str, torch.Tensor]:
    """Attention step by step; every tensor is per query head, (B, H, T, ...). The queries sit at positions
    start .. start + T - 1 of the keys."""
    k, v = per_query_head(k, q.size(1)), per_query_head(v, q.size(1))
    scores = q @ k.transpose(-2, -1)  # (B, H, T, T_k): raw q.k for every query/key pair
    scaled = scores / math.sqrt(q.size(-1))
    mask = causal_mask(q.size(-2), k.size(-2), start, q.device)
    weights = scaled.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # each row sums to 1
    context = weights @ v  # (B, H, T, D): each token's context vector, per head
    return dict(query=q, key=k, value=v, scores=scores, scaled_scores=scaled, weights=weights, context=context)


def per_query_head(kv: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, H, T, D), each key/value head repeated for the query heads it serves (for reading
    and for the reference only: the fast paths never make this copy)."""
    return kv.repeat_interleave(n_head // kv.size(1), dim=1)


def causal_attention(q, k, v, dropout: float) -> torch.Tensor:
    """Attention of T queries over the same T positions, with dropout on the weights. (B, H, T, D).

    On a GPU: the fused kernel (flash attention). A CPU does better two other ways: with dropout, torch falls back
    to a path that draws every dropout bit from its slowest generator and works in fp32, so attention_with_dropout
    computes the weights in the input's precision; without dropout, the bf16 kernel's backward pass is slow on
    short sequences, so those go through the fp32 kernel.
    """
    grouped = q.size(1) != k.size(1)
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=grouped)
    with torch.autocast("cpu", enabled=False):  # the precision is chosen here, not by autocast's op lists
        if dropout > 0:
            return attention_with_dropout(q, k, v, dropout)
        if q.dtype == torch.bfloat16 and q.size(-2) <= 128:
            q32, k32, v32 = q.float(), k.float(), v.float()
            return F.scaled_dot_product_attention(q32, k32, v32, is_causal=True, enable_gqa=grouped).type_as(q)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)


def cached_attention(q, k, v, start: int) -> torch.Tensor:
    """Attention of T new queries at positions start .. start + T - 1 over all start + T cached keys."""
    grouped = q.size(1) != k.size(1)
    if q.size(-2) == 1:  # one new token sees every cached one: no mask needed
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=grouped)
    mask = causal_mask(q.size(-2), k.size(-2), start, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=grouped)


def attention_with_dropout(q, k, v, p: float, rows: int = ATTENTION_ROWS) -> torch.Tensor:
    """Causal attention step by step; each weight is dropped with probability p, and the kept ones scaled up.

    The queries go in blocks of `rows`, each against the keys up to its own last position only: the weights that
    the causal mask would zero are neither computed nor given random bits. Both scalings act on the (B, H, T, D)
    side rather than the weights: the same numbers, less work. Masks are applied as sums and products, never
    masked_fill, which is not vectorised on a CPU for a boolean mask. Query heads that share a key/value head are
    stacked on a dimension of their own, so the keys and values are read in place."""
    B, H, T, D = q.shape
    groups = H // k.size(1)
    q = q * (1.0 / math.sqrt(D))
    if groups > 1:  # (B, H_kv, groups, T, D) against (B, H_kv, 1, T, D)
        q, k, v = q.view(B, k.size(1), groups, T, D), k.unsqueeze(2), v.unsqueeze(2)
    blocks = []
    for start in range(0, T, rows):
        end = min(start + rows, T)
        bias = causal_bias(end - start, end, q.dtype, q.device)
        scores = q[..., start:end, :] @ k[..., :end, :].transpose(-2, -1) + bias
        weights = scores.softmax(dim=-1)  # (..., end - start, end)
        blocks.append((weights * keep_mask(weights.shape, p, q.device)) @ v[..., :end, :])
    context = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-2)
    return (context * (1.0 / (1.0 - p))).view(B, H, T, D)


def causal_bias(t_query: int, t_key: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(t_query, t_key), for queries at the last t_query of t_key positions: 0 where query i may see key j, -inf
    where j is later than i; added to the scores."""
    bias = torch.full((t_query, t_key), float("-inf"), dtype=dtype, device=device)
    return bias.triu_(diagonal=t_key - t_query + 1)


def causal_mask(t_query: int, t_key: int, start: int, device) -> torch.Tensor:
    """(t_query, t_key) booleans: query i (at position start + i) may see keys 0 .. start + i."""
    return torch.ones(t_query, t_key, dtype=torch.bool, device=device).tril(diagonal=start)
