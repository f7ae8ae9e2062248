"""RMSNorm's forward + backward on a CPU, torch's rms_norm under autograd against potion's RMSNormFunction, at the
shapes of the presets that use it: the block norms (B, T, C) and the query/key norms (B, T, H, D).

potion.model.RMSNorm takes RMSNormFunction on a CPU while training; this is the measurement behind that choice.
Each figure is the median milliseconds of one norm, forward and backward, over --reps calls after two untimed ones.

Usage (from the project root):
    python benchmarks/norm_cpu.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine import emit, median_of, result  # noqa: E402

from potion.hardware import keep_freed_memory, set_threads  # noqa: E402
from potion.kernels.norms import RMSNormFunction  # noqa: E402

SHAPES = [  # (preset, which norm, shape)
    ("tiny", "block", (16, 64, 128)),
    ("tiny", "query/key", (16, 64, 4, 32)),
    ("shakespeare-fast", "block", (32, 128, 256)),
    ("shakespeare-fast", "query/key", (32, 128, 4, 64)),
]
EPS = 1e-6


def torch_rms_norm(x, gain):  # as potion ran it before: the gain cast to x's dtype, autograd's own backward
    return F.rms_norm(x, (x.size(-1),), gain.to(x.dtype), EPS)


def potion_rms_norm(x, gain):
    return RMSNormFunction.apply(x, gain, EPS)


def median_ms(fn, shape: tuple, dtype: torch.dtype, reps: int) -> float:
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    gain = torch.ones(shape[-1], requires_grad=True)
    grad = torch.randn(*shape, dtype=dtype)
    return round(median_of(lambda: fn(x, gain).backward(grad), reps, warmup=2) * 1e3, 3)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args(argv)
    threads = set_threads()
    keep_freed_memory()  # as training does
    for preset, which, shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            torch_ms = median_ms(torch_rms_norm, shape, dtype, args.reps)
            potion_ms = median_ms(potion_rms_norm, shape, dtype, args.reps)
            emit(
                {
                    **result("norm_cpu", "cpu", dtype, threads),
                    "preset": preset,
                    "norm": which,
                    "shape": shape,
                    "ms_forward_backward": {"torch_rms_norm": torch_ms, "potion_rms_norm": potion_ms},
                    "speedup": round(torch_ms / potion_ms, 2),
                }
            )


if __name__ == "__main__":
    main()
