"""Speculative decoding: a 4-bit copy of the model drafts a few tokens, the decoder checks them all in one pass.

At batch 1 on a CPU a decode step takes as long as reading the weights. A copy whose matrices are 4-bit integers
(with a bf16 scale and offset for every group of 64 numbers) reads about a quarter of the bf16 bytes, so it
guesses the next few tokens quickly. The decoder then runs once over all the guesses, reading its own weights
once for all of them, and keeps the guesses up to the first one it would not have produced itself, plus its own
token after that. So the output is the decoder's: greedy tokens are its argmax at every position, and sampled
tokens follow its distribution exactly (a drafted token is kept with probability min(1, p/q), and a rejected one
is replaced by a draw from the leftover max(p - q, 0)). The drafts only decide how fast it goes.

The two share one cache: the drafter reads the decoder's keys and values of every token so far (so it needs no
prefill of its own and guesses with the decoder's view of the past) and writes its own for its guesses, which the
check overwrites.
"""

from __future__ import annotations

import copy
import functools
from typing import Callable

import torch
from torch import nn

from potion.infer.sampling import draw, greedy_tokens, in_vocabulary
from potion.model.attention import fuse_projections
from potion.model.cache import KVCache

DRAFT_TOKENS = 4  # guesses per check to start from: the best count for 90% of drafts kept (best_draft_count)
# docs/benchmarks.md, "Decoding internals": where these two come from
MAX_ADAPTED_DRAFTS = 8  # a check of up to 9 rows costs about what one row does with packed weights
DRAFT_COST = 0.4  # a 4-bit draft step's time over a check's
INT4_GROUPS = (64, 128, 32)  # numbers sharing one scale and offset, in order of preference


@functools.cache
def int4_available() -> bool:
    """Whether this PyTorch has the CPU kernels for 4-bit weights (and they run here)."""
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.zeros(16, 64, dtype=torch.int32), 8)
        scales = torch.ones(1, 16, 2, dtype=torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.ones(1, 64, dtype=torch.bfloat16), packed, 64, scales)
    except (AttributeError, RuntimeError):
        return False
    return True


def best_draft_count(kept: int, tested: int) -> int:
    """The number of guesses per check that makes the most tokens per unit of time.

    With each guess kept with probability a, a check of k guesses makes 1 + a + ... + a^k tokens (the decoder adds
    one of its own) and costs k * DRAFT_COST + 1 checks' time. a is estimated from the drafts tested so far (those
    up to and including each check's first miss; the ones after it were never tested), starting from 9 of 10 so
    that a fresh sequence begins at DRAFT_TOKENS. The count depends on the tokens alone, never on timings, so a
    seed still gives the same text.
    """
    a = (kept + 9) / (tested + 10)

    def tokens_per_time(k: int) -> float:
        return sum(a**i for i in range(k + 1)) / (k * DRAFT_COST + 1)

    return max(range(1, MAX_ADAPTED_DRAFTS + 1), key=tokens_per_time)


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) -> the kernel's packed 4-bit weight and its (K / group, N, 2) bf16 scales and offsets.

    Each group of `group` numbers along K maps its [min, max] onto 0..15; the kernel reads a number back as
    (q - 8) * scale + offset, hence offset = min + 8 * scale.
    """
    n, k = weight.shape
    groups = weight.float().view(n, k // group, group)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).view(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)
    scales_and_offsets = torch.stack((scale, low + 8 * scale), dim=-1).view(n, k // group, 2).transpose(0, 1)
    return packed, scales_and_offsets.contiguous().to(torch.bfloat16)


class Int4Linear(nn.Module):
    """A Linear whose weight is stored in 4 bits; rows are padded to the kernel's multiple of 16."""

    def __init__(self, linear: nn.Linear, group: int):
        super().__init__()
        self.out_features, self.group = linear.out_features, group
        weight = linear.weight.detach()
        padding = -self.out_features % 16
        if padding:
            weight = torch.cat((weight, weight.new_zeros(padding, weight.size(1))))
        packed, scales = quantize_int4(weight, group)
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A draft step of GPT-2 small makes 49 of these calls, so each skips what it can
        rows = x.reshape(-1, x.size(-1))
        if rows.dtype != torch.bfloat16:
            rows = rows.to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group, self.scales)
        if y.size(1) != self.out_features:
            y = y[:, : self.out_features]
        if self.bias is not None:
            y = y.add_(self.bias)  # the kernel's fresh output: no copy needed
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


def int4_group(in_features: int) -> int | None:
    return next((g for g in INT4_GROUPS if in_features % g == 0), None)


def make_drafter(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A copy of model with every Linear the kernel can take in 4 bits, its other numbers (norms, embeddings) in
    dtype."""
    drafter = copy.deepcopy(model).to(dtype)
    fuse_projections(drafter)
    for module in list(drafter.modules()):
        for name, child in list(module.named_children()):
            group = int4_group(child.in_features) if isinstance(child, nn.Linear) else None
            if group is not None:
                setattr(module, name, Int4Linear(child, group))
    return drafter


def keep_or_replace(p: torch.Tensor, q: torch.Tensor, drafted: int, generator) -> int | None:
    """Speculative sampling's test of one drafted token: None keeps it, else the token that replaces it.

    p, q: (V,) the decoder's and the drafter's probabilities. Kept with probability min(1, p/q); otherwise a draw
    from max(p - q, 0), renormalised. Either way the token that comes out is distributed as p.
    """
    u = torch.rand((), generator=generator, device=p.device)
    if u * q[drafted] <= p[drafted]:
        return None
    leftover = (p - q).clamp(min=0)
    if not bool(leftover.sum() > 0):  # p == q up to rounding: the test above can only fail by rounding too
        leftover = p
    return int(draw(leftover, generator))


def draft(drafter, cache: KVCache, token: int, k: int, pick: Callable) -> tuple[list[int], list]:
    """Let the drafter guess the k tokens after `token`, which follows the cache's tokens.

    The drafter writes its keys and values past cache.length and leaves the length as it was: the decoder's check
    overwrites them with its own. pick(logits (1, V)) -> (token, its probabilities or None). Returns the guesses
    and their probabilities.
    """
    start, device = cache.length, cache.layers[0].key.device
    tokens, probs = [], []
    for _ in range(k):
        logits = drafter(torch.tensor([[token]], device=device), cache=cache, last_only=True)[:, -1]
        token, q = pick(logits)
        tokens.append(token)
        probs.append(q)
    cache.length = start
    return tokens, probs


def check(
    logits: torch.Tensor, drafted: list[int], drafted_probs: list, probs_of: Callable, generator, vocab_size: int = 0
):
    """Compare the decoder's logits (k + 1, V) with k drafted tokens.

    Returns how many drafts stand and the token after them: the decoder's replacement for the first rejected
    draft, or None when the decoder's own choice is to be drawn from logits[kept]. Greedy drafts (their
    probabilities None) are checked all at once against the decoder's choices, which also give the token after.
    """
    if drafted_probs[0] is None:
        choices = greedy_tokens(in_vocabulary(logits, vocab_size)).tolist()
        kept = next((i for i, (own, guess) in enumerate(zip(choices, drafted)) if own != guess), len(drafted))
        return kept, choices[kept]
    for i, token in enumerate(drafted):
        replacement = keep_or_replace(probs_of(logits[i : i + 1])[0], drafted_probs[i][0], token, generator)
        if replacement is not None:
            return i, replacement
    return len(drafted), None
