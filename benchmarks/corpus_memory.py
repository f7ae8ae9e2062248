"""Memory on a big corpus: does the resident set grow with the size of the text?

For each size, writes a generated corpus (one text file) under a temporary folder, then in a fresh process
tokenizes it (potion's own prepare: hashing, the character vocabulary, the token file) and trains a tiny model for
a few steps on it, and prints one JSON line: the machine, torch version, device, dtype, threads, the corpus size,
the tokens, the seconds, and the peak resident set size (RSS) of the potion process (VmHWM), of the largest
tokenizing worker, and of all of them together (sampled every 0.2 s). The corpus, its tokens and the run are
deleted afterwards.

    python benchmarks/corpus_memory.py                       # 200 MB and 2 GB (about 10 minutes on 2 cores)
    python benchmarks/corpus_memory.py --sizes-mb 50 400     # a quick check

The text is words drawn at random from a small vocabulary, written as 8 MB chunks picked from a pool of 16, so
that writing 2 GB takes seconds; potion reads, hashes and tokenizes every byte of it all the same.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
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

CHUNK_BYTES = 8 << 20
WORDS = (
    "the of and to in a is that for it as was with be by on not he i this are or his from at which but have an "
    "they you were her she there one all we their when been has would more if will what them so no my can who"
).split()


def write_corpus(path: Path, size_mb: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    pool = []
    for _ in range(16):
        text, n = [], 0
        while n < CHUNK_BYTES:
            line = " ".join(rng.choices(WORDS, k=rng.randint(4, 16))) + (".\n" if rng.random() < 0.9 else "\n\n")
            text.append(line)
            n += len(line)
        pool.append("".join(text).encode())
    with open(path, "wb") as f:
        written = 0
        while written < size_mb << 20:
            chunk = rng.choice(pool)
            f.write(chunk)
            written += len(chunk)


def rss_kb(pid: int | str = "self", field: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


class TotalRSS(threading.Thread):
    """The RSS of this process and its children together, every 0.2 s; keeps the peak."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_kb, self.stop = 0, threading.Event()

    def run(self):
        me = os.getpid()
        while not self.stop.wait(0.2):
            total = rss_kb() + sum(rss_kb(child) for child in children(me))
            self.peak_kb = max(self.peak_kb, total)


def measure(corpus: Path, steps: int, device: str) -> dict:
    """In this (fresh) process: tokenize the corpus and train a few steps; the figures."""
    config = resolve(
        "tiny",
        None,
        [
            f"data={corpus}",
            "n_layer=2",
            "n_head=2",
            "n_embd=64",
            "context_length=64",
            "batch_size=16",
            f"max_steps={steps}",
            "max_time=0",
            f"eval_every={steps}",
            "eval_batches=2",
            "sample_tokens=0",
            "warmup_steps=2",
            f"device={device}",
        ],
    )
    sampler = TotalRSS()
    sampler.start()
    rss_start = rss_kb()
    started = time.time()
    token_file = prepare(config.data, quiet=True)
    tokenized, rss_peak_tokenizing = time.time(), rss_kb(field="VmHWM")
    with tempfile.TemporaryDirectory(prefix="potion-corpus-memory-run-") as tmp:
        summary = train(config, Path(tmp) / "run", quiet=True)
    ended = time.time()
    sampler.stop.set()
    sampler.join()
    dev = pick_device(device)
    return {
        **result("corpus_memory", dev, pick_dtype(config.train.dtype, dev)),
        "corpus_mb": round(corpus.stat().st_size / 2**20),
        "tokens": len(token_file.tokens),
        "token_file_mb": round((token_file.folder / "tokens.bin").stat().st_size / 2**20),
        "tokenize_seconds": round(tokenized - started, 1),
        "train_steps": summary["steps"],
        "train_seconds": round(ended - tokenized, 1),
        "rss_start_mb": round(rss_start / 1024, 1),
        "rss_peak_tokenizing_mb": round(rss_peak_tokenizing / 1024, 1),
        "rss_peak_mb": round(rss_kb(field="VmHWM") / 1024, 1),
        "worker_rss_peak_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "all_processes_rss_peak_mb": round(max(sampler.peak_kb, rss_kb(field="VmHWM")) / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[200, 2048])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the corpus and its tokens are written")
    parser.add_argument("--measure", metavar="CORPUS", help=argparse.SUPPRESS)  # the fresh process's part
    args = parser.parse_args()

    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.steps, args.device)), flush=True)
        return
    for size_mb in args.sizes_mb:
        folder = Path(tempfile.mkdtemp(prefix="potion-corpus-memory-", dir=args.tmp))
        try:
            corpus = folder / "corpus.txt"
            write_corpus(corpus, size_mb)
            command = [sys.executable, __file__, "--measure", str(corpus), "--steps", str(args.steps)]
            command += ["--device", args.device]
            env = {**os.environ, "POTION_CACHE": str(folder / "cache")}
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
            emit(json.loads(out.stdout.strip().splitlines()[-1]))
        finally:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
