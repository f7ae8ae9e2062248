"""Causal attention's forward + backward on a CPU, in the ways potion could run it, at the presets' shapes.

potion.model.causal_attention picks among these on a CPU; this is the measurement behind its choice. Each figure is
the median milliseconds of one layer's attention, forward and backward, over --reps calls after two untimed ones.
With --compile each way runs through torch.compile, as it does inside a compiled model.

Usage (from the project root):
    python benchmarks/attention_cpu.py [--compile]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine import emit, median_of, result  # noqa: E402

from potion.hardware import keep_freed_memory, set_threads  # noqa: E402
from potion.kernels.attention import attention_with_dropout  # noqa: E402
from potion.kernels.dropout import drop_threshold, random_int16  # noqa: E402

# (preset, batch, heads, tokens, head size, dropout)
SHAPES = [
    ("tiny", 16, 4, 64, 32, 0.0),
    ("shakespeare-fast", 32, 4, 128, 64, 0.1),
    ("shakespeare-char", 64, 6, 256, 64, 0.2),
]


def median_ms(fn, shape: tuple, dtype: torch.dtype, reps: int) -> float:
    q, k, v = (torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(*shape, dtype=dtype)
    return round(median_of(lambda: fn(q, k, v).backward(grad), reps, warmup=2) * 1e3, 2)


def ways(p: float) -> dict:
    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)

    def sdpa_in_fp32(q, k, v):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, dropout_p=p).type_as(q)

    found = {"sdpa": sdpa, "sdpa_in_fp32": sdpa_in_fp32}
    if p > 0:
        found["step_by_step_with_fast_dropout"] = lambda q, k, v: attention_with_dropout(q, k, v, p)
        found["step_by_step_in_one_block"] = lambda q, k, v: attention_with_dropout(q, k, v, p, rows=q.size(-2))
        found["step_by_step_masked_fill"] = lambda q, k, v: attention_by_masked_fill(q, k, v, p)
    return found


def attention_by_masked_fill(q, k, v, p: float) -> torch.Tensor:
    """potion's step-by-step attention as it was, with both masks applied by masked_fill: the same random bits and
    the same numbers, to show what a boolean mask's masked_fill costs on a CPU."""
    T = q.size(-2)
    scores = (q * (1.0 / math.sqrt(q.size(-1)))) @ k.transpose(-2, -1)
    later = torch.ones(T, T, dtype=torch.bool).triu_(diagonal=1)
    weights = scores.masked_fill(later, float("-inf")).softmax(dim=-1)
    dropped = random_int16(weights.shape, weights.device) < drop_threshold(p)
    return (weights.masked_fill(dropped, 0.0) @ v) * (1.0 / (1.0 - p))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="time each way compiled (after its compiling calls)")
    args = ap.parse_args(argv)
    threads = set_threads()
    keep_freed_memory()  # as training does: without it, every large block is fresh pages from the system
    for preset, *shape, p in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            found = ways(p)
            if args.compile:
                found = {name: torch.compile(fn) for name, fn in found.items()}
            figures = {name: median_ms(fn, tuple(shape), dtype, args.reps) for name, fn in found.items()}
            emit(
                {
                    **result("attention_cpu", "cpu", dtype, threads),
                    "preset": preset,
                    "shape_bhtd": shape,
                    "dropout": p,
                    "compiled": args.compile,
                    "ms_forward_backward": figures,
                }
            )


if __name__ == "__main__":
    main()
