"""The network: the GPT (gpt.py), its attention (attention.py), its KV cache (cache.py), the facts derived from its
shape (shapes.py), and what it computed when explain asks (record.py). It imports only config and kernels."""

from potion.model.cache import KVCache
from potion.model.gpt import GPT
from potion.model.shapes import Shapes

__all__ = ["GPT", "KVCache", "Shapes"]
