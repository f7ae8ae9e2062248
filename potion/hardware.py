"""What the machine can do: which device, which precision, how many threads."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import time

import torch

from potion.errors import PotionError


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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 autocast where the hardware runs it fast (CUDA with bf16, CPUs with AMX/AVX-512 BF16), else fp32."""
    if name in DTYPES:
        return DTYPES[name]
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


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so that a wall-clock timing measures the work and not its launch."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_size(device: torch.device, dtype: torch.dtype) -> int:
    """Big enough to keep the device's matrix units busy, small enough to measure in well under a second.

    A data-centre GPU needs 8192 to saturate. On a 2-core CPU 1024 measured within 2% of 2048 in an eighth of the
    time. bf16 on a CPU without bf16 hardware is emulated: at 1024 a single call would take seconds, so 256.
    """
    if device.type == "cuda":
        return 8192
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_fast_bf16():
        return 256
    return 1024


@functools.lru_cache(maxsize=8)
def matmul_peak_tflops(
    device: torch.device | str, dtype: torch.dtype, size: int | None = None, repeats: int = 10
) -> float:
    """Measured TFLOP/s of a square matmul in this dtype: the yardstick for model FLOPs utilisation (MFU).

    The training progress bar and the benchmarks both use it, so their MFU figures compare. Two untimed calls
    first (thread pools, allocator, GPU clocks), then the best of `repeats` timed ones: other work on the
    machine only ever adds time, so the fastest call is the steadiest estimate of what the hardware can do.
    """
    device = torch.device(device)
    n = size or matmul_size(device, dtype)
    # Its own generator: the global RNG belongs to training (exact resume). On the GPU, so 8192^2 numbers
    # are not drawn by the CPU and copied over.
    where = device if device.type == "cuda" else torch.device("cpu")
    generator = torch.Generator(where).manual_seed(0)
    a = torch.randn(n, n, generator=generator, device=where).to(device, dtype)
    b = torch.randn(n, n, generator=generator, device=where).to(device, dtype)
    for _ in range(2):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e12


def set_threads(n: int | None = None) -> int:
    """n threads; by default one per physical core, unless OMP_NUM_THREADS says otherwise (a machine shared with
    other work)."""
    if n is None:
        try:
            n = max(1, int(os.environ["OMP_NUM_THREADS"]))
        except (KeyError, ValueError):
            n = physical_cores()
    torch.set_num_threads(n)
    return n


@functools.cache
def keep_freed_memory() -> bool:
    """Have the C allocator keep the memory that a training step frees, for the next step to reuse.

    glibc's malloc serves every block over 32 MB straight from the system and hands it back on free, so each step
    of a model with large activations (`shakespeare-char`'s are 50 MB each) paid again to fault in and zero fresh
    pages: `shakespeare-char` trained at 5,736 tokens/s with this against 4,274 without, in bf16 on a 2-core CPU
    (measured). The process then holds its peak memory until it ends, as it would at its peak anyway. Linux with
    glibc only; elsewhere nothing changes. Returns whether it took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


# When compiling pays, as (the share of the matmul peak an eager run reaches, the seconds of eager training from
# which compiling is the faster way), per device. Measured:
# - a 2-core CPU with bf16 hardware: compiling costs about half a minute from an empty cache (shakespeare-char: a
#   20-step run took 130 s compiled against 96 s eager), then saves 17% of each bf16 step there (50% for tiny's); in
#   fp32 it saved 3.5%, so a CPU compiles bf16 runs only. Eager shakespeare-char reached 40% of the peak in bf16.
# - an H200, shakespeare-char at batch 128: compiling cost about 30 s with an empty cache and 5.5 s with the
#   compiled kernels on disk, then a step took 17 ms against 25-28 eagerly (CUDA graphs and evaluations included),
#   so it pays after about 75 s of eager training, or 15 s. Eager, that step reached 12% of the peak.
COMPILE_PAYS = {"cpu": (0.4, 600.0), "cuda": (0.12, 30.0)}


def compiles_by_default(
    device: torch.device, dtype: torch.dtype, run_flops: float, peak_tflops: float, max_time: float = 0.0
) -> bool:
    """Whether compile = "auto" compiles: when the run's eager time, estimated from its FLOPs at an eager run's
    share of the measured matmul peak and capped by max_time, is long enough for compiling to pay (COMPILE_PAYS).
    On a CPU, only bf16 runs; never on other devices."""
    if device.type not in COMPILE_PAYS or (device.type == "cpu" and dtype != torch.bfloat16):
        return False
    eager_share, pays_after = COMPILE_PAYS[device.type]
    seconds = run_flops / (eager_share * peak_tflops * 1e12)
    return (min(seconds, max_time) if max_time > 0 else seconds) >= pays_after


def maybe_compile(model: torch.nn.Module, wanted: bool, cuda_graphs: bool = False) -> torch.nn.Module:
    """torch.compile(model) if wanted. If compiling fails (no C++ compiler, an unsupported platform) the model runs
    eagerly with a warning instead of stopping the run.

    cuda_graphs: replay each compiled graph's kernels as one CUDA graph ("reduce-overhead"). A small model's step
    is otherwise bound by the host launching its kernels one by one: shakespeare-char on an H200 ran 6.8 ms of
    kernels in an 11.6 ms step (measured).
    """
    if not wanted:
        return model
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    return torch.compile(model, mode="reduce-overhead" if cuda_graphs else None)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
