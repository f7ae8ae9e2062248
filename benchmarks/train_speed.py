"""Training throughput of potion's own trainer against the plain reference GPT, in the same run.

For each preset: `potion.train.train` runs the preset as a user gets it (its dtype, compile setting, threads and
optimizer), then the reference (benchmarks/reference_gpt.py, the same shape, vocabulary, batch and dropout: fp32
eager AdamW on a CPU; bf16, compiled, fused AdamW on a GPU). potion logs tokens/s every 10 steps; the first window
(allocator growth, compilation) is dropped and the median of the rest is reported. Its model FLOP/s is given as a
fraction of the best matmul peak the device reaches in any precision potion can train in (fp32, bf16), measured
in this run by the routine the progress bar's MFU uses (the best over matmul sizes, reported with the size that
reached it), and as MFU against the peak of the precision it picked.

Usage (from the project root):
    python benchmarks/train_speed.py --preset shakespeare-char --steps 30
    python benchmarks/train_speed.py --preset tiny --preset shakespeare-fast --set compile=on
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from chardata import DEFAULT_DATA  # noqa: E402
from machine import dtype_name, emit, matmul_peak, read_log, result, run_json  # noqa: E402

from potion.config import resolve  # noqa: E402
from potion.data.tokens import prepare  # noqa: E402
from potion.formats.run import read_config  # noqa: E402
from potion.hardware import MatmulPeak, pick_device, pick_dtype  # noqa: E402
from potion.model import GPT  # noqa: E402
from potion.train.loop import LOG_EVERY, train  # noqa: E402
from potion.train.setup import wants_compile  # noqa: E402


def reference_speed(model_config, batch: int, steps: int, threads: int, device: torch.device) -> dict:
    """The plain GPT of the same shape: fp32 eager on a CPU; on a GPU its GPU recipe (bf16, compiled, fused
    AdamW: the recipe of the GPU trainers potion is compared with)."""
    gpu_recipe = ["--dtype", "bf16", "--compile"] if device.type == "cuda" else []
    cmd = [
        sys.executable,
        str(HERE / "reference_gpt.py"),
        "--device",
        device.type,
        "--vocab-size",
        str(model_config.vocab_size),
        *gpu_recipe,
        "--mode",
        "speed",
        "--steps",
        str(steps),
        "--threads",
        str(threads),
        "--n-layer",
        str(model_config.n_layer),
        "--n-head",
        str(model_config.n_head),
        "--n-embd",
        str(model_config.n_embd),
        "--context",
        str(model_config.context_length),
        "--batch",
        str(batch),
        "--dropout",
        str(model_config.dropout),
    ]
    return run_json(cmd)


def compile_as_in_full_run(preset: str, overrides: list[str]) -> str:
    """compile=on or off as potion decides for the preset's whole schedule (compile = "auto" included); the few
    steps measured here would, on their own, never be worth compiling."""
    config = resolve(preset, None, [f"data={DEFAULT_DATA}", *overrides])
    device = pick_device(config.train.device)
    dtype = pick_dtype(config.train.dtype, device)
    vocab_size = prepare(config.data, quiet=True).tokenizer.vocab_size
    with torch.device("meta"):
        flops = GPT(replace(config.model, vocab_size=vocab_size)).training_flops_per_token()
    on = wants_compile(config, device, dtype, flops, matmul_peak(device, dtype).tflops, step=0)
    return f"compile={'on' if on else 'off'}"


def potion_speed(preset: str, overrides: list[str], steps: int) -> dict:
    """Run potion's trainer for `steps` steps with no evaluation in between; read its logged tokens/s windows."""
    steps = max(steps, 3 * LOG_EVERY)
    with tempfile.TemporaryDirectory() as tmp:
        config = resolve(
            preset,
            None,
            [
                f"data={DEFAULT_DATA}",
                f"max_steps={steps}",
                f"eval_every={steps}",
                "eval_batches=1",
                "sample_tokens=0",
                "max_time=0",
                *overrides,
            ],
        )
        summary = train(config, out=Path(tmp) / "run", quiet=True)
        config = read_config(Path(tmp) / "run")  # with the vocabulary size filled in
        rows = read_log(Path(tmp) / "run")
    windows = [r["tokens_per_second"] for r in rows if r["kind"] == "train"][1:]
    return config, summary, windows


def precision_peaks(device: torch.device) -> dict[str, MatmulPeak]:
    """The matmul peak of every precision potion can train in (the best over matmul sizes, with the size that
    reached it), measured now with the one shared routine: the best of them is the limit potion's throughput is held
    to, whichever precision it picked.

    Measured again after the run and the higher figure kept, since other work only ever slows a matmul down: the
    figure cached at the run's start once read 0.51 TFLOP/s against 1.21-1.40 in every other run on the same CPU, and
    made that run 94% of its peak."""
    dtypes = (torch.float32, torch.bfloat16)
    at_start = {dtype: matmul_peak(device, dtype) for dtype in dtypes}
    matmul_peak.cache_clear()
    again = {dtype: matmul_peak(device, dtype) for dtype in dtypes}
    return {dtype_name(dtype): max(at_start[dtype], again[dtype], key=lambda p: p.tflops) for dtype in dtypes}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", action="append", help="preset(s) to measure (default: shakespeare-char)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for potion's run")
    ap.add_argument("--steps", type=int, default=30, help="potion steps (10 per logged window; the first is dropped)")
    ap.add_argument("--reference-steps", type=int, default=10)
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args(argv)

    for preset in args.preset or ["shakespeare-char"]:
        overrides = [*args.set, compile_as_in_full_run(preset, args.set)]
        config, summary, windows = potion_speed(preset, overrides, args.steps)
        device = pick_device(config.train.device)
        dtype = pick_dtype(config.train.dtype, device)
        threads = torch.get_num_threads()
        m = config.model
        tokens_per_second = statistics.median(windows)
        flops = GPT(m).training_flops_per_token()
        peaks = precision_peaks(device)
        best_dtype, peak = max(peaks.items(), key=lambda item: item[1].tflops)
        record = {
            **result("train_speed", device, dtype, threads),
            "preset": preset,
            "overrides": args.set,
            "compile": config.train.compile,
            "optimizer": config.train.optimizer,
            "parameters": summary["parameters"],
            "batch": config.train.batch_size,
            "context": m.context_length,
            "dropout": m.dropout,
            "potion_tokens_per_second": round(tokens_per_second, 1),
            "potion_windows_tokens_per_second": windows,
            "potion_tflops": round(flops * tokens_per_second / 1e12, 4),
            **{f"matmul_peak_tflops_{name}": round(p.tflops, 4) for name, p in peaks.items()},
            **{f"matmul_peak_size_{name}": p.size for name, p in peaks.items()},  # the matmul size that reached it
            "best_peak_dtype": best_dtype,
            "best_peak": str(peak),  # e.g. "2.81 TFLOP/s, bf16 matmul at 2048"
            "potion_fraction_of_best_peak": round(flops * tokens_per_second / 1e12 / peak.tflops, 4),
            "potion_mfu_own_dtype": round(flops * tokens_per_second / 1e12 / peaks[dtype_name(dtype)].tflops, 4),
        }
        if not args.no_reference:
            ref = reference_speed(m, config.train.batch_size, args.reference_steps, threads, device)
            record.update(
                reference_recipe=f"{ref['dtype']}, {'compiled' if ref['compile'] else 'eager'}",
                reference_tokens_per_second=ref["tokens_per_second"],
                reference_ms_per_step=ref["ms_per_step"],
                speedup=round(tokens_per_second / ref["tokens_per_second"], 2),
            )
        emit(record)


if __name__ == "__main__":
    main()
