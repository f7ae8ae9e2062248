"""Memory over a long run: does the resident set grow while potion trains for many small steps?

Trains a tiny model with potion's own loop (evaluation, logging, checkpoints and all) for --steps steps and
prints one JSON line: the machine, torch version, device, dtype, threads, the steps, and the resident set size
(RSS) at the start (potion, torch and the data loaded), about a tenth of the way in (model, optimizer and caches
warm), at the end, and its peak. rss_end_mb close to rss_warm_mb means no leak per step.

    python benchmarks/memory.py                 # 20,000 steps, a few minutes on a laptop CPU
    python benchmarks/memory.py --steps 2000    # a quick check
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine import emit, result  # noqa: E402

from potion.config import resolve  # noqa: E402
from potion.data.tokens import prepare  # noqa: E402
from potion.hardware import pick_device, pick_dtype  # noqa: E402
from potion.train.loop import train  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyshakespeare.txt"


def rss_mb(field: str = "VmRSS") -> float:
    """Resident set size (or its peak, VmHWM) of this process in MB, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Sampler(threading.Thread):
    """RSS every `every` seconds, so the figure a tenth of the way in can be picked afterwards."""

    def __init__(self, every: float = 0.5):
        super().__init__(daemon=True)
        self.every, self.samples, self.stop = every, [], threading.Event()

    def run(self):
        while not self.stop.wait(self.every):
            self.samples.append((time.time(), rss_mb()))

    def at_fraction(self, started: float, ended: float, fraction: float) -> float:
        target = started + fraction * (ended - started)
        return min(self.samples, key=lambda s: abs(s[0] - target))[1] if self.samples else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--data", default=str(SHAKESPEARE) if SHAKESPEARE.is_file() else "pydocs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--eval-every", type=int, default=1000, help="evaluations and checkpoints along the way")
    args = parser.parse_args()

    os.environ.setdefault("POTION_CACHE", tempfile.mkdtemp(prefix="potion-memory-cache-"))
    config = resolve(
        "tiny",
        None,
        [
            f"data={args.data}",
            "n_layer=2",
            "n_head=2",
            "n_embd=32",
            "context_length=32",
            "batch_size=8",
            f"max_steps={args.steps}",
            "max_time=0",
            f"eval_every={args.eval_every}",
            "eval_batches=2",
            "sample_tokens=0",
            "warmup_steps=20",
            f"device={args.device}",
        ],
    )
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory(prefix="potion-memory-") as tmp:
        prepare(config.data, quiet=True)  # tokenize (and cache) before the measurement starts
        rss_start = rss_mb()
        sampler = Sampler()
        sampler.start()
        started = time.time()
        summary = train(config, Path(tmp) / "run", quiet=True)
        ended = time.time()
        sampler.stop.set()
        rss_end = rss_mb()
    emit(
        {
            **result("memory", device, pick_dtype(config.train.dtype, device)),
            "steps": summary["steps"],
            "parameters": summary["parameters"],
            "seconds": round(ended - started, 1),
            "rss_start_mb": round(rss_start, 1),
            "rss_warm_mb": round(sampler.at_fraction(started, ended, 0.1), 1),
            "rss_end_mb": round(rss_end, 1),
            "rss_peak_mb": round(rss_mb("VmHWM"), 1),
        }
    )


if __name__ == "__main__":
    main()
