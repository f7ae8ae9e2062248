"""Every fact derived from a ModelConfig's numbers, in one place: head size, key/value heads, feed-forward width,
cache shape, parameter counts and FLOPs per token."""

from __future__ import annotations

from dataclasses import dataclass

from potion.config import ModelConfig


@dataclass(frozen=True)
class Shapes:
    n_layer: int
    n_embd: int  # C: the width of the residual stream
    n_head: int  # H: query heads
    n_kv_head: int  # H_kv: key/value heads; each serves n_head / n_kv_head query heads
    head_dim: int  # D
    ffn_hidden: int  # F: the feed-forward network's inner width
    gated: bool  # a SwiGLU feed-forward: two widening matrices (gate and up) instead of one
    context_length: int
    vocab_size: int
    bias: bool  # biases on every linear layer (and LayerNorm)
    qkv_bias: bool  # biases on the query, key and value projections
    layernorm: bool
    norm_eps: float  # added to the variance in every norm

    @classmethod
    def of(cls, config: ModelConfig) -> "Shapes":
        head_dim = config.head_dim or config.n_embd // config.n_head
        layernorm = config.norm == "layernorm"
        return cls(
            n_layer=config.n_layer,
            n_embd=config.n_embd,
            n_head=config.n_head,
            n_kv_head=config.n_kv_head or config.n_head,
            head_dim=head_dim,
            ffn_hidden=config.ffn_hidden or config.mlp_ratio * config.n_embd,
            gated=config.mlp_activation == "swiglu",
            context_length=config.context_length,
            vocab_size=config.vocab_size,
            bias=config.bias,
            qkv_bias=config.bias or config.qkv_bias,
            layernorm=layernorm,
            norm_eps=config.norm_eps or (1e-5 if layernorm else 1e-6),
        )

    @property
    def q_dim(self) -> int:
        """Width of all query heads side by side (H * D)."""
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of all key (or value) heads side by side (H_kv * D)."""
        return self.n_kv_head * self.head_dim

    @property
    def groups(self) -> int:
        """Query heads per key/value head: 1 is multi-head attention, n_head is multi-query attention."""
        return self.n_head // self.n_kv_head

    def cache_shape(self, batch_size: int, length: int | None = None) -> tuple[int, int, int, int]:
        """One layer's keys (or values) for `length` positions (the whole context by default): only the key/value
        heads, (B, H_kv, T, D)."""
        return (batch_size, self.n_kv_head, length or self.context_length, self.head_dim)

    def cache_bytes(self, batch_size: int, element_size: int) -> int:
        """Keys and values of every layer for batch_size full contexts."""
        n = batch_size * self.n_kv_head * self.context_length * self.head_dim
        return 2 * self.n_layer * n * element_size

    def block_parameters(self, qk_norm: bool = False) -> int:
        """Numbers in one block: two norms, attention's four matrices, the feed-forward's two or three."""
        C, F = self.n_embd, self.ffn_hidden
        norm = C * (2 if self.layernorm and self.bias else 1)
        attention = C * self.q_dim + 2 * C * self.kv_dim + self.q_dim * C
        widening = 2 if self.gated else 1
        mlp = widening * C * F + F * C
        if self.qkv_bias:
            attention += self.q_dim + 2 * self.kv_dim
        if self.bias:
            attention += C
            mlp += widening * F + C
        return 2 * norm + attention + mlp + (2 * self.head_dim if qk_norm else 0)

    def training_flops_per_token(self, qk_norm: bool = False) -> int:
        """Forward + backward: 6 per weight a token is multiplied by (blocks and head; embeddings are lookups),
        plus causal attention's q.k and weighted sum of values over the context."""
        multiplied = self.n_layer * self.block_parameters(qk_norm) + self.vocab_size * self.n_embd
        return 6 * multiplied + 6 * self.n_layer * self.q_dim * self.context_length
