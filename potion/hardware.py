"""What the machine can do: which device, which precision, how many threads, how fast a matmul runs."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import sys
import time
from dataclasses import dataclass

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
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


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


@dataclass(frozen=True)
class MatmulPeak:
    """The most TFLOP/s a square matmul reached on one device in one precision, and the size that reached it:
    the yardstick of model FLOPs utilisation (MFU)."""

    tflops: float
    size: int
    dtype: str  # bf16 | fp32, as the config names it

    def __str__(self) -> str:
        return f"{self.tflops:.2f} TFLOP/s, {self.dtype} matmul at {self.size}"


def matmul_sizes(device: torch.device, dtype: torch.dtype) -> tuple[int, ...]:
    """The square sizes the peak is measured at, small to large: each doubling may still gain. On an AMX CPU bf16
    reached 1.57 TFLOP/s at 1024 and 2.81 at 2048; a data-centre GPU needs 8192 to saturate. bf16 on a CPU without
    bf16 hardware is emulated: at 1024 a single call would take seconds, so 256 alone."""
    if device.type == "cuda":
        return (2048, 4096, 8192)
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_fast_bf16():
        return (256,)
    return (1024, 2048, 4096)


MATMUL_CALL_SECONDS = 0.25  # the next size is measured only while one call of it would take at most this long
MATMUL_SIZE_SECONDS = 0.2  # the timed calls at one size stop after this many seconds (and at least two calls)


@functools.lru_cache(maxsize=8)
def matmul_peak(device: torch.device | str, dtype: torch.dtype) -> MatmulPeak:
    """The best TFLOP/s of a square matmul in this dtype over matmul_sizes, measured once per (device, dtype).

    The training progress bar and the benchmarks both use it, so their MFU figures compare. Each size is the
    fastest of a few calls: other work on the machine only ever adds time. A size whose call would take longer
    than MATMUL_CALL_SECONDS (8 times the last one's) is left out, so that a slow device, which its smaller sizes
    already keep busy, measures in about a second; the size that reached the peak is part of the figure.
    """
    device = torch.device(device)
    sizes = matmul_sizes(device, dtype)
    # Its own generator: the global RNG belongs to training (exact resume). On the GPU, so the numbers are not
    # drawn by the CPU and copied over. One block of the smallest size, tiled: drawing 4096^2 numbers on a CPU
    # would take longer than multiplying them.
    where = device if device.type == "cuda" else torch.device("cpu")
    generator = torch.Generator(where).manual_seed(0)
    a, b = (torch.randn(sizes[0], sizes[0], generator=generator, device=where).to(device, dtype) for _ in "ab")
    best = None
    for n in sizes:
        reps = n // sizes[0]
        seconds = fastest_matmul(a.repeat(reps, reps), b.repeat(reps, reps), warmup=2 if n == sizes[0] else 0)
        peak = MatmulPeak(2 * n**3 / seconds / 1e12, n, DTYPE_NAMES[dtype])
        best = peak if best is None or peak.tflops > best.tflops else best
        if 8 * seconds > MATMUL_CALL_SECONDS:
            break
    return best


def fastest_matmul(a: torch.Tensor, b: torch.Tensor, warmup: int = 0, repeats: int = 10) -> float:
    """Seconds of the fastest of up to `repeats` timed calls of a @ b (fewer once MATMUL_SIZE_SECONDS are spent),
    after `warmup` untimed ones (thread pools, allocator, GPU clocks)."""
    for _ in range(warmup):
        torch.mm(a, b)
    best, spent, calls = math.inf, 0.0, 0
    while calls < 2 or (calls < repeats and spent < MATMUL_SIZE_SECONDS):
        synchronize(a.device)
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize(a.device)
        seconds = time.perf_counter() - started
        best, spent, calls = min(best, seconds), spent + seconds, calls + 1
    return best


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
