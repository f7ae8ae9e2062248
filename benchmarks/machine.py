"""Shared helpers for potion's benchmarks: describe the machine, time things, print results.

Every benchmark prints one JSON line per result so that runs on different machines can be
collected and compared by a script; the machine description travels with each line.

Benchmarks import this as a sibling module (``from machine import ...``); running
``python benchmarks/x.py`` puts ``benchmarks/`` on ``sys.path`` automatically.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# The benchmarks describe the machine the way potion itself sees it (its bf16 and thread choices).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# matmul_peak is potion's own (the best over matmul sizes), so that the benchmarks' MFU and the training progress
# bar's compare.
from potion.hardware import cpu_flags, matmul_peak, physical_cores, synchronize  # noqa: E402


def _cpuinfo_text() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:  # not Linux
        return ""


def cpu_model_name() -> str:
    for line in _cpuinfo_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: str | torch.device = "cpu") -> dict:
    """A hostname-free description of where a benchmark ran."""
    device = torch.device(device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = "cpu"
    return {
        "cpu_model": cpu_model_name(),
        "physical_cores": physical_cores(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": device.type,
        "device_name": device_name,
        "torch_threads": torch.get_num_threads(),
        "cpu_avx512_bf16": "avx512_bf16" in cpu_flags(),
        "cpu_amx_bf16": "amx_bf16" in cpu_flags(),
        # Other work on the machine skews timings; a 1-minute load well above zero at the start
        # of a run marks its numbers as suspect.
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def time_once(fn: Callable[[], object], device: str | torch.device = "cpu") -> float:
    """Seconds one call of ``fn`` takes, GPU work included."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def median_of(fn: Callable[[], object], reps: int, device: str | torch.device = "cpu", warmup: int = 1) -> float:
    """Median seconds per call of ``fn`` over ``reps`` timed calls after ``warmup`` untimed ones.

    The median, not the mean, so that one slow call (a page fault, another process) does not
    move the figure.
    """
    for _ in range(warmup):
        fn()
    return statistics.median(time_once(fn, device) for _ in range(reps))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def result(benchmark: str, device: str | torch.device, dtype: torch.dtype, threads: int | None = None) -> dict:
    """The fields every result line starts with, so that lines from different machines can be told apart."""
    return {
        "benchmark": benchmark,
        "machine": machine_info(device),
        "dtype": dtype_name(dtype),
        "threads": torch.get_num_threads() if threads is None else threads,
    }


def emit(record: dict) -> None:
    """Print one result as a single JSON line on stdout (flushed, so partial runs keep results).

    The load average at the end goes with it: other processes that arrived mid-run show there, not in the
    machine description taken at the start.
    """
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    print(json.dumps({**record, "load_avg_1m_end": load}), flush=True)


def run_json(cmd: list[str]) -> dict:
    """Run a benchmark in its own process (so that it starts cold) and return the last JSON line it printed."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def read_log(run_dir: Path) -> list[dict]:
    """The rows of a potion run's log.jsonl."""
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    # `python benchmarks/machine.py`: describe this machine and its matmul ceilings, with the size that reached each.
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    info = machine_info(dev)
    peaks = {name: matmul_peak(dev, dtype) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    figures = {f"matmul_tflops_{name}": round(peak.tflops, 4) for name, peak in peaks.items()}
    figures |= {f"matmul_size_{name}": peak.size for name, peak in peaks.items()}
    emit({"benchmark": "machine", **info, **figures})
