"""What the model computed, when asked: explain's view inside a forward pass, without arguments for it in forward.

    with recording(model) as records:
        logits = model(idx)
    records[layer]["weights"]  # (B, H, T, T): that layer's attention weights

Each block's dict holds the attention steps of potion.kernels.attention.attention_steps (query, key, value,
scores, scaled_scores, weights, context; keys and values per query head) and the residual stream's pieces:
residual_in (the block's input), attn_out and mlp_out (what attention and the feed-forward step added to it).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def recording(model) -> Iterator[list[dict]]:
    records: list[dict] = [{} for _ in model.blocks]
    hooks = []
    for record, block in zip(records, model.blocks):
        block.attn.record = record
        hooks.append(block.register_forward_pre_hook(lambda _, args, r=record: r.update(residual_in=args[0])))
        hooks.append(block.attn.register_forward_hook(lambda _, args, out, r=record: r.update(attn_out=out)))
        hooks.append(block.mlp.register_forward_hook(lambda _, args, out, r=record: r.update(mlp_out=out)))
    try:
        yield records
    finally:
        for block in model.blocks:
            block.attn.record = None
        for hook in hooks:
            hook.remove()
