"""The network: the GPT, its attention, its KV cache, and the facts derived from its shape."""

from potion.model.gpt import GPT, KVCache

__all__ = ["GPT", "KVCache"]
