"""The KV cache: the keys and values of the tokens seen so far, so each new token is one step, not a rerun.

Only the key/value heads are stored (B, H_kv, context, D): with grouped-query attention that is n_head / n_kv_head
times less memory than a copy per query head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from potion.config import ModelConfig
from potion.model.shapes import Shapes


@dataclass
class LayerCache:
    """Keys and values of the tokens seen so far, preallocated for the whole context."""

    key: torch.Tensor  # (B, H_kv, context_length, D)
    value: torch.Tensor  # (B, H_kv, context_length, D)


@dataclass
class KVCache:
    """One LayerCache per block plus the number of positions already filled."""

    layers: list[LayerCache]
    length: int = 0

    @classmethod
    def empty(cls, config: ModelConfig, batch_size: int, device, dtype, length: int | None = None) -> "KVCache":
        """Zeros for `length` positions (default: the whole context; a model of 128k positions generating a few
        hundred tokens needs only those)."""
        shape = Shapes.of(config).cache_shape(batch_size, length)
        layers = [
            LayerCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(config.n_layer)
        ]
        return cls(layers)

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
        copied = torch.empty_like(tensor, dtype=dtype)  # (B, H_kv, context, D)
        copied[:, :, : self.length] = tensor[:, :, : self.length]
        return copied
