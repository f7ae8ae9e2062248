"""What the machine can do: which device, which precision, how many threads."""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from .errors import PotionError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PotionError("--device cuda was asked for, but this torch sees no CUDA GPU; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PotionError("--device mps was asked for, but MPS is not available here; use --device cpu or auto")
    return torch.device(name)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """bf16 matrix units (AMX) or AVX-512 BF16 instructions; without them bf16 on a CPU is far slower than fp32."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 autocast where the hardware runs it fast (CUDA with bf16, CPUs with AMX/AVX-512 BF16), else fp32."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@functools.lru_cache(maxsize=1)
def physical_cores() -> int:
    """Cores, not hyper-threads: two threads on one core only fight over its matrix units."""
    cores = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            physical = core = None
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    physical = value.strip()
                elif key == "core id":
                    core = value.strip()
                elif not line.strip() and core is not None:
                    cores.add((physical, core))
                    physical = core = None
            if core is not None:
                cores.add((physical, core))
    except OSError:
        pass
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(len(cores) or available, available))


@functools.lru_cache(maxsize=4)
def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured TFLOP/s of a square matmul in this dtype: the yardstick for model FLOPs utilisation (MFU).

    A quick measurement (well under a second) at a size that fills the device without taking long; the
    benchmarks measure more carefully.
    """
    import time

    n = 4096 if device.type == "cuda" else 1024
    generator = torch.Generator().manual_seed(0)  # its own: the global RNG belongs to training (exact resume)
    a = torch.randn(n, n, generator=generator).to(device, dtype)
    b = torch.randn(n, n, generator=generator).to(device, dtype)
    best = float("inf")
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e12


def set_threads() -> int:
    """One thread per physical core, unless OMP_NUM_THREADS says otherwise (e.g. on a machine shared with other work)."""
    try:
        n = max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        n = physical_cores()
    torch.set_num_threads(n)
    return n


def maybe_compile(model: torch.nn.Module, setting: str, device: torch.device) -> torch.nn.Module:
    """torch.compile where asked, or by default ("auto") on CUDA only: on the CPUs measured it sped up the tiny
    preset and slowed the larger ones (see the README). If compiling fails (no C++ compiler, an unsupported
    platform) the model runs eagerly with a warning instead of stopping the run."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return model
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    return torch.compile(model)
