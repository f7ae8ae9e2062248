"""Dropout from cheap random bits.

torch's own dropout draws one Bernoulli per number on a CPU, its slowest generator; here one 64-bit draw gives four
16-bit numbers, each compared with a threshold.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_int16(shape: torch.Size, device) -> torch.Tensor:
    """Numbers spread evenly over the 65,536 int16 values, from torch's generator: four per 64-bit draw."""
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    return words.view(torch.int16)[:n].view(shape)


def drop_threshold(p: float) -> int:
    """The int16 value below which a random_int16 number is dropped: that happens with probability p."""
    return round(p * 65536) - 32768


def keep_mask(shape: torch.Size, p: float, device) -> torch.Tensor:
    """uint8 ones and zeros, zero with probability p (to 1 part in 65,536), to multiply by: a product is
    vectorised on a CPU where masked_fill with a boolean mask is not."""
    return (random_int16(shape, device) >= drop_threshold(p)).view(torch.uint8)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero each number with probability p while training, scaling the rest by 1 / (1 - p)."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    return x * keep_mask(x.shape, p, x.device) * (1.0 / (1.0 - p))


def dropout_reference(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, training=training)
