import os
import sys

import pytest
import torch

from potion import hardware
from potion.config import ModelConfig
from potion.model import GPT


def test_bf16_only_where_the_hardware_runs_it_fast(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    assert hardware.pick_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert hardware.pick_dtype("auto", cpu) == torch.bfloat16
    assert hardware.pick_dtype("fp32", cpu) == torch.float32


def test_compile_by_default_for_runs_long_enough_to_repay_it():
    cpu, cuda, bf16, fp32 = torch.device("cpu"), torch.device("cuda"), torch.bfloat16, torch.float32
    minute_on_gpu = 60 * 0.12 * 800e12  # the FLOPs of a minute at 12% of an 800 TFLOP/s peak
    assert hardware.compiles_by_default(cuda, bf16, run_flops=minute_on_gpu, peak_tflops=800)
    assert not hardware.compiles_by_default(cuda, bf16, run_flops=minute_on_gpu / 3, peak_tflops=800)  # 20 s
    assert not hardware.compiles_by_default(cuda, bf16, run_flops=minute_on_gpu, peak_tflops=800, max_time=20)
    hour = 3600 * 0.4 * 1e12  # the FLOPs of an hour at 40% of a 1 TFLOP/s peak
    assert hardware.compiles_by_default(cpu, bf16, run_flops=hour, peak_tflops=1.0)
    assert not hardware.compiles_by_default(cpu, bf16, run_flops=hour / 60, peak_tflops=1.0)  # a minute: not worth it
    assert not hardware.compiles_by_default(cpu, bf16, run_flops=hour, peak_tflops=1.0, max_time=60)
    assert not hardware.compiles_by_default(cpu, fp32, run_flops=hour, peak_tflops=1.0)  # it saves little in fp32
    assert not hardware.compiles_by_default(torch.device("mps"), bf16, run_flops=hour, peak_tflops=1.0)
    model = GPT(ModelConfig(vocab_size=20, context_length=8, n_layer=1, n_head=2, n_embd=8))
    assert hardware.maybe_compile(model, False) is model


def test_matmul_peak_leaves_the_global_random_state_alone():
    before = torch.get_rng_state()
    hardware.matmul_peak.cache_clear()
    peak = hardware.matmul_peak(torch.device("cpu"), torch.float32)
    assert peak.tflops > 0 and peak.size in hardware.matmul_sizes(torch.device("cpu"), torch.float32)
    assert torch.equal(before, torch.get_rng_state())


def test_matmul_peak_stays_quick_where_bf16_is_emulated(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    assert max(hardware.matmul_sizes(cpu, torch.bfloat16)) < min(hardware.matmul_sizes(cpu, torch.float32))


def resident_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_freed_memory_stays_with_the_process_for_the_next_step():
    assert hardware.keep_freed_memory()
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # over glibc's 32 MB: it used to come from the system
    with_block = resident_bytes()
    del block
    assert resident_bytes() > with_block - 32 * 2**20  # not handed back: the next step reuses it
