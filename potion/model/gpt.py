"""The GPT: token embedding + positions, a stack of blocks, a final norm and a linear head.

Each block is the two steps of the potion metaphor:
  1. masked self-attention: every token's query is compared with the keys of itself and the tokens before it,
     the scaled scores are softmaxed into attention weights (each row sums to 1), and the weighted sum of the
     values is the token's context vector;
  2. the feed-forward network (the "thinking step");
each wrapped in a residual link: x = x + step(norm(x)).

Shapes: B = batch, T = time (tokens), C = n_embd, H = n_head, D = head_dim = C / H, V = vocab_size.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from potion.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return RMSNormFunction.apply(x, self.weight, self.eps)
        # the gain in x's dtype: a bf16 input with an fp32 gain falls off the fused kernel
        return F.rms_norm(x, (x.size(-1),), self.weight.to(x.dtype), self.eps)


class RMSNormFunction(torch.autograd.Function):
    """x / rms(x) * gain over the last dimension, computed in fp32 and returned in x's dtype, with a hand-written
    backward pass. On a CPU, autograd's own backward of rms_norm is a chain of a dozen small operations and sums the
    gain's gradient in bf16; this one takes fewer passes and sums in fp32 (benchmarks/norm_cpu.py)."""

    @staticmethod
    def forward(ctx, x, gain, eps):
        # x times an fp32 tensor is an fp32 tensor: each product below reads x once, with no separate copy
        precision = torch.promote_types(x.dtype, torch.float32)
        squares = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=precision).square_()
        rstd = squares.div_(x.size(-1)).add_(eps).rsqrt_()  # (..., 1): 1 / rms(x)
        ctx.save_for_backward(x, gain, rstd)
        return torch.mul(x * rstd, gain, out=torch.empty_like(x))

    @staticmethod
    def backward(ctx, grad):
        x, gain, rstd = ctx.saved_tensors
        normed = x * rstd  # x / rms(x), fp32
        grad_gain = (grad * normed).sum(tuple(range(x.dim() - 1)))
        grad_normed = grad * gain
        # d(normed)/dx projects out the component along normed, then scales by 1 / rms
        along = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = torch.mul(grad_normed.sub_(normed.mul_(along)), rstd, out=torch.empty_like(x))
        return grad_x, grad_gain, None


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim)
    return nn.LayerNorm(dim, bias=config.bias)


def rope_tables(head_dim: int, length: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (length, head_dim / 2)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) of each head vector by a position-dependent angle. x: (B, T, H, D).

    In x's own precision: a bf16 rotation rounds no more than the bf16 query it rotates, and the round trip through
    fp32 cost a tenth of tiny's attention in bf16 (measured)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[None, :, None].to(x.dtype), sin[None, :, None].to(x.dtype)  # (1, T, 1, D/2)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


@dataclass
class LayerCache:
    """Keys and values of the tokens seen so far, preallocated for the whole context."""

    key: torch.Tensor  # (B, H, context_length, D)
    value: torch.Tensor  # (B, H, context_length, D)


@dataclass
class KVCache:
    """One LayerCache per block plus the number of positions already filled."""

    layers: list[LayerCache]
    length: int = 0

    @classmethod
    def empty(cls, config: ModelConfig, batch_size: int, device, dtype) -> "KVCache":
        shape = (batch_size, config.n_head, config.context_length, config.head_dim)
        zeros = functools.partial(torch.zeros, shape, device=device, dtype=dtype)
        return cls([LayerCache(zeros(), zeros()) for _ in range(config.n_layer)])

    def advance(self, n: int) -> None:
        """Count n more positions as filled (the forward pass has just written their keys and values)."""
        self.length += n

    def reset(self) -> None:
        """Start again from position 0; the old keys and values are overwritten as the cache refills."""
        self.length = 0

    def to(self, dtype: torch.dtype) -> "KVCache":
        """This cache with its keys and values in dtype (itself when they already are). Only the filled positions
        are copied: the rest is written before it is read."""
        if self.layers[0].key.dtype == dtype:
            return self
        layers = [
            LayerCache(self._filled_copy(layer.key, dtype), self._filled_copy(layer.value, dtype))
            for layer in self.layers
        ]
        return KVCache(layers, self.length)

    def _filled_copy(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        copied = torch.empty_like(tensor, dtype=dtype)  # (B, H, context, D)
        copied[:, :, : self.length] = tensor[:, :, : self.length]
        return copied


class Attention(nn.Module):
    """Causal multi-head self-attention with named query, key and value projections."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.query = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # what each token looks for
        self.key = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # what each token offers
        self.value = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # what each token passes on
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # mixes the heads' context vectors
        self.fused_qkv: nn.Linear | None = None  # see fuse_projections
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        self.dropout = config.dropout
        self.resid_dropout = Dropout(config.dropout)

    def fuse_projections(self) -> None:
        """Replace query, key and value by one Linear that computes all three side by side: for generation's
        decoding copies, one product and one call where there were three (5% of a GPT-2 small decode step on a
        CPU, measured). Training, checkpoints and explain keep the three named ones."""
        with torch.no_grad():
            weight, bias = self.side_by_side()
        fused = nn.Linear(self.query.in_features, weight.size(0), bias=bias is not None, device="meta")
        fused.weight = nn.Parameter(weight)
        if bias is not None:
            fused.bias = nn.Parameter(bias)
        self.fused_qkv = fused
        del self.query, self.key, self.value

    def side_by_side(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The query, key and value weights (3C, C) and biases (3C,) stacked, in that order."""
        parts = (self.query, self.key, self.value)
        bias = torch.cat([p.bias for p in parts]) if parts[0].bias is not None else None
        return torch.cat([p.weight for p in parts]), bias

    def projections(self, x):
        """Query, key and value of x (B, T, C), each (B, T, C).

        While training, one product against the three weights side by side: one call forward and one for each
        gradient, where three named products made nine (tiny's attention forward and backward on a CPU: 4.75 ms
        against 5.2, measured)."""
        if self.fused_qkv is not None:
            return self.fused_qkv(x).chunk(3, dim=-1)
        if not self.training:
            return self.query(x), self.key(x), self.value(x)
        return F.linear(x, *self.side_by_side()).chunk(3, dim=-1)

    def split_heads(self, x):  # (B, T, C) -> (B, T, H, D); the norms and rotations run on this contiguous layout
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim)

    def forward(
        self,
        x,
        rope=None,
        cache: LayerCache | None = None,
        start: int = 0,
        trace: dict | None = None,
        value_embedding=None,
    ):
        B, T, C = x.shape
        q, k, v = self.projections(x)
        if value_embedding is not None:
            v = v + value_embedding
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)  # each (B, T, H, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:  # write this step's keys/values, then attend over everything so far
            cache.key[:B, :, start : start + T] = k
            cache.value[:B, :, start : start + T] = v
            k, v = cache.key[:B, :, : start + T], cache.value[:B, :, : start + T]

        if trace is not None:
            y = self.explicit_attention(q, k, v, start, trace)
        elif start == 0:
            y = causal_attention(q, k, v, self.dropout if self.training else 0.0)  # (B, H, T, D)
        elif T == 1:  # one new token sees every cached one: no mask needed
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, start + T, start, x.device))
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.proj(y))

    def explicit_attention(self, q, k, v, start: int, trace: dict):
        """The same computation as scaled_dot_product_attention, step by step, recording every piece."""
        scores = q @ k.transpose(-2, -1)  # (B, H, T, T_total): raw q.k for every query/key pair
        scaled = scores / math.sqrt(self.head_dim)
        mask = causal_mask(q.size(-2), k.size(-2), start, q.device)
        weights = scaled.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # each row sums to 1
        context = weights @ v  # (B, H, T, D): each token's context vector, per head
        trace.update(query=q, key=k, value=v, scores=scores, scaled_scores=scaled, weights=weights, context=context)
        return context


def causal_attention(q, k, v, dropout: float) -> torch.Tensor:
    """softmax(q.k / sqrt(D)) . v over each token and the ones before it, with dropout on the attention weights.

    On a GPU: the fused kernel (flash attention). A CPU does better two other ways (benchmarks/attention_cpu.py):
    with dropout, torch falls back to a path that draws every weight's dropout bit from its slowest generator and
    does the arithmetic in fp32, so the weights are computed here in the input's precision, with random bits drawn
    four to a word; without dropout, the bf16 kernel's backward pass is slow on short sequences, so those go
    through the fp32 kernel.
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
    with torch.autocast("cpu", enabled=False):  # the precision is chosen here, not by autocast's op lists
        if dropout > 0:
            return attention_with_dropout(q, k, v, dropout)
        if q.dtype == torch.bfloat16 and q.size(-2) <= 128:
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).type_as(q)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


# Queries per block in attention_with_dropout. At shakespeare-char's shape (256 tokens) on a 2-core CPU, one layer's
# attention forward and backward took, in blocks of 128 against one block (benchmarks/attention_cpu.py): compiled,
# 105 ms against 138 in bf16 and 162 against 229 in fp32; eagerly, 124 against 129 and 183 against 210. Blocks of 64
# saved no more when compiled and cost time eagerly.
ATTENTION_ROWS = 128


def attention_with_dropout(q, k, v, p: float, rows: int = ATTENTION_ROWS) -> torch.Tensor:
    """Causal attention step by step; each weight is dropped with probability p, and the kept ones scaled up.

    The queries go in blocks of `rows`, each against the keys up to its own last position only: the weights that
    the causal mask would zero (a quarter of them at 256 tokens, in blocks of 128) are neither computed nor given
    random bits. Both scalings act on the (B, H, T, D) side rather than the weights: the same numbers, less work.
    Masks are applied as sums and products, never masked_fill: with a boolean mask that is not vectorised on a CPU
    (shakespeare-char's attention forward and backward in bf16: 125 ms against 188, benchmarks/attention_cpu.py)."""
    T = q.size(-2)
    q = q * (1.0 / math.sqrt(q.size(-1)))
    blocks = []
    for start in range(0, T, rows):
        end = min(start + rows, T)
        scores = q[:, :, start:end] @ k[:, :, :end].transpose(-2, -1) + causal_bias(end - start, end, q.dtype, q.device)
        weights = scores.softmax(dim=-1)  # (B, H, end - start, end)
        blocks.append((weights * keep_mask(weights.shape, p, q.device)) @ v[:, :, :end])
    context = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-2)  # (B, H, T, D)
    return context * (1.0 / (1.0 - p))


def causal_bias(t_query: int, t_key: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(t_query, t_key), for queries at the last t_query of t_key positions: 0 where query i may see key j, -inf
    where j is later than i; added to the scores."""
    bias = torch.full((t_query, t_key), float("-inf"), dtype=dtype, device=device)
    return bias.triu_(diagonal=t_key - t_query + 1)


def keep_mask(shape: torch.Size, p: float, device) -> torch.Tensor:
    """uint8 ones and zeros, zero with probability p (to 1 part in 65,536), to multiply by."""
    return (random_int16(shape, device) >= drop_threshold(p)).view(torch.uint8)


def random_int16(shape: torch.Size, device) -> torch.Tensor:
    """Numbers spread evenly over the 65,536 int16 values, from torch's generator: one 64-bit draw gives four, a
    quarter of the draws of a Bernoulli per element."""
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    return words.view(torch.int16)[:n].view(shape)


def drop_threshold(p: float) -> int:
    """The int16 value below which a random_int16 number is dropped: that happens with probability p."""
    return round(p * 65536) - 32768


class Dropout(nn.Module):
    """Zero each number with probability p while training, scaling the rest by 1 / (1 - p). On a CPU with the
    random bits of keep_mask: torch's own dropout draws one Bernoulli per number, and took a fifth of a
    shakespeare-char training step."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return x * keep_mask(x.shape, self.p, x.device) * (1.0 / (1.0 - self.p))


def in_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in autocast's precision (bf16) when autocast is on: cast once here rather than by each of the layers that
    read it (query, key and value would each make their own copy)."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def causal_mask(t_query: int, t_key: int, start: int, device) -> torch.Tensor:
    """(t_query, t_key) booleans: query i (at position start + i) may see keys 0 .. start + i."""
    return torch.ones(t_query, t_key, dtype=torch.bool, device=device).tril(diagonal=start)


def fuse_projections(model: nn.Module) -> None:
    """One product for the query, key and value of every attention layer in model (Attention.fuse_projections)."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.fuse_projections()


class ReluSquared(torch.autograd.Function):
    """relu(h)², with a backward pass of two elementwise passes where autograd's own chain of relu and product
    takes four (tiny's relu² forward and backward in bf16 on a CPU: 0.35 ms against 0.50, measured)."""

    @staticmethod
    def forward(ctx, h):
        r = F.relu(h)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return (grad * r).mul_(2)  # d(r²)/dh = 2r, and 0 where h < 0 because r is 0 there


def relu_squared(h: torch.Tensor) -> torch.Tensor:
    return ReluSquared.apply(h)


def gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation. When compiled, written with a sigmoid instead (gelu_by_sigmoid): the
    compiler fuses that into one pass, and a CPU's tanh costs several times its exp (shakespeare-char's MLP forward
    and backward, compiled: 155 ms against 174, measured)."""
    if torch.compiler.is_compiling():
        return gelu_by_sigmoid(h)
    return F.gelu(h, approximate="tanh")


def gelu_by_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """h (1 + tanh z) / 2 = h sigmoid(2 z), where z = sqrt(2 / pi) (h + 0.044715 h^3): the same function."""
    return h * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (h + 0.044715 * h * h * h))


class MLP(nn.Module):
    """The feed-forward "thinking step": widen, a non-linearity, project back."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.up = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.activation = config.mlp_activation
        self.dropout = Dropout(config.dropout)

    def forward(self, x):
        h = self.up(x)  # (B, T, 4C)
        h = gelu_tanh(h) if self.activation == "gelu" else relu_squared(h)
        return self.dropout(self.down(h))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(config, config.n_embd)
        self.attn = Attention(config)
        self.norm2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, start=0, trace: dict | None = None, value_embedding=None):
        attn_out = self.attn(in_compute_dtype(self.norm1(x)), rope, cache, start, trace, value_embedding)
        x = x + attn_out  # residual link around attention
        mlp_out = self.mlp(self.norm2(x))
        if trace is not None:
            trace.update(attn_out=attn_out, mlp_out=mlp_out)
        return x + mlp_out  # residual link around the feed-forward step


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        if config.positions == "learned":
            self.position_embedding = nn.Embedding(config.context_length, config.n_embd)
        else:
            cos, sin = rope_tables(config.head_dim, config.context_length, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if config.value_embeddings:  # a token's identity fed straight into what it passes on, in every layer
            self.value_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_norm = make_norm(config, config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.token_embedding.weight
        self.reset_parameters()

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
        """Forward + backward: 6 per weight a token is multiplied by (blocks and head; embeddings are lookups),
        plus causal attention's q.k and weighted sum of values."""
        c = self.config
        multiplied = sum(p.numel() for p in self.blocks.parameters()) + self.head.weight.numel()
        return 6 * multiplied + 6 * c.n_layer * c.n_embd * c.context_length

    def forward(
        self, idx, targets=None, cache: KVCache | None = None, trace: list | None = None, *, last_only: bool = False
    ):
        """idx: (B, T) token ids. Returns logits (B, T, V), and the mean cross-entropy if targets are given.

        With a cache, idx continues the cached sequence. With trace=[] (explicit attention path), one dict per
        block is appended holding queries, keys, values, scores, weights and outputs. last_only=True reads out
        only the last position, logits (B, 1, V): all that generation needs, without the output layer's work for
        the other positions.
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
        x = self.dropout(x)
        value_embedding = self.value_embedding(idx) if self.config.value_embeddings else None
        for i, block in enumerate(self.blocks):
            record = None
            if trace is not None:
                record = {"residual_in": x}
                trace.append(record)
            x = block(x, rope, cache.layers[i] if cache is not None else None, start, record, value_embedding)
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

    def new_cache(self, batch_size: int = 1) -> KVCache:
        p = next(self.parameters())
        return KVCache.empty(self.config, batch_size, p.device, p.dtype)

    def generate(self, idx, max_new_tokens: int, **sampling):
        """Yield new token ids one at a time; see potion.generate.generate_tokens for the options."""
        from potion.infer.generate import generate_tokens  # the sampling rules live with generation, not the network

        yield from generate_tokens(self, idx, max_new_tokens, **sampling)
