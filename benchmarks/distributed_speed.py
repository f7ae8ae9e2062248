"""Training throughput on 1 process and on N processes (torchrun) with the same global batch, DDP and FSDP2, with
AdamW and with Muon.

Every run is `potion train` as a user starts it, one process or `torchrun --standalone --nproc_per_node=N -m potion
train`, on the same preset, data and global batch; rank 0 logs the tokens/s of all processes together every 10
steps. The first window (allocator growth) is dropped and the median of the rest is reported; `scaling` is N
processes' tokens/s over one process's, with the same optimizer. One process gets all the cores as threads; N
processes get cores / N threads each (torchrun's OMP_NUM_THREADS is overridden), so both use the same cores.

On a machine with fewer cores than a GPU box has GPUs, N processes share the same cores: this measures the cost
of the collectives and of splitting the batch, not a speed-up.

Usage (from the project root):
    python benchmarks/distributed_speed.py --preset tiny --steps 60 --processes 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from chardata import DEFAULT_DATA  # noqa: E402
from machine import emit, machine_info, read_log  # noqa: E402

from potion.hardware import physical_cores  # noqa: E402


def run_training(preset: str, processes: int, parallel: str, optimizer: str, steps: int, overrides: list[str]):
    """tokens/s windows of one `potion train` run (rank 0's log), and the threads each process had."""
    threads = max(1, physical_cores() // processes)
    settings = [f"max_steps={steps}", f"eval_every={steps}", "eval_batches=1", "sample_tokens=0", "max_time=0"]
    settings += [f"optimizer={optimizer}", *overrides] + ([f"parallel={parallel}"] if parallel else [])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        train = ["-m", "potion", "train", "--preset", preset, "--data", str(DEFAULT_DATA), "--quiet", "--out", str(out)]
        train += [a for s in settings for a in ("--set", s)]
        launch = [sys.executable]
        if processes > 1:
            launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(HERE.parent)}
        subprocess.run([*launch, *train], check=True, env=env, capture_output=True)
        windows = [r["tokens_per_second"] for r in read_log(out) if r["kind"] == "train"][1:]
    return windows, threads


def muon_share(preset: str, overrides: list[str], reps: int = 20) -> dict:
    """In one process: the time of Muon's step (orthogonalising every hidden matrix whole, as each FSDP rank does)
    against a forward and backward pass over one global batch."""
    from machine import median_of

    from potion.config import resolve
    from potion.hardware import autocast, pick_device, pick_dtype
    from potion.model import GPT
    from potion.train.optim import make_optimizer

    config = resolve(preset, None, ["vocab_size=65", *overrides, "optimizer=muon"])  # Muon whatever the runs use
    device = pick_device(config.train.device)
    dtype = pick_dtype(config.train.dtype, device)
    model = GPT(config.model).to(device)
    adamw, muon = make_optimizer(model, config.train, device.type)
    x = torch.randint(0, 65, (config.train.batch_size, config.model.context_length), device=device)

    def forward_backward():
        with autocast(device, dtype):
            _, loss = model(x, x)
        loss.backward()

    forward_backward()
    step_seconds = median_of(forward_backward, reps, device)
    muon_seconds = median_of(muon.step, reps, device)
    return {"forward_backward_ms": round(1e3 * step_seconds, 2), "muon_step_ms": round(1e3 * muon_seconds, 2)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=60, help="steps per run (10 per logged window; the first dropped)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    ap.add_argument("--muon-only", action="store_true", help="only the share of Muon's step, in this process")
    args = ap.parse_args(argv)

    share = muon_share(args.preset, args.set)
    emit({"benchmark": "distributed_speed.muon_share", "machine": machine_info("cpu"), "preset": args.preset, **share})
    if args.muon_only:
        return
    alone: dict[str, float] = {}
    for optimizer in ("adamw", "muon"):
        for processes, parallel in ((1, ""), (args.processes, "ddp"), (args.processes, "fsdp")):
            windows, threads = run_training(args.preset, processes, parallel, optimizer, args.steps, args.set)
            speed = statistics.median(windows)
            alone.setdefault(optimizer, speed)
            emit(
                {
                    "benchmark": "distributed_speed",
                    "machine": machine_info("cpu"),
                    "torch_version": torch.__version__,
                    "preset": args.preset,
                    "overrides": args.set,
                    "optimizer": optimizer,
                    "processes": processes,
                    "parallel": parallel or "none",
                    "threads_per_process": threads,
                    "tokens_per_second": round(speed, 1),
                    "windows_tokens_per_second": windows,
                    "scaling": round(speed / alone[optimizer], 3),
                }
            )


if __name__ == "__main__":
    main()
