"""The whole CUDA check in one command (`scripts/gpu-check`): one JSON line per check on stdout.

1. the machine: GPU, torch, matmul peaks in fp32 and bf16;
2. the tests that have a GPU variant (tests/test_cuda.py): cache == recomputation, SDPA (flash) == explicit
   attention, resume within bf16 tolerance, NaN steps dropped by fused AdamW and Muon, no host sync per step,
   compiled == eager;
3. training speed of `shakespeare-char` and `gpt2` against the plain GPT in its GPU recipe (bf16, compiled);
4. time to a validation loss of 1.47 on Tiny Shakespeare, for the GPU recipes worth trying;
5. generation speed.

Made for a GPU machine that has torch but no network: potion runs from this folder (PYTHONPATH) and pip is
never called, so nothing reaches for the network. Each check has its own time limit and a failed check does
not stop the others. `--dry-run` runs the same plumbing on the CPU with tiny sizes, to prove the script before a
GPU is at hand. `--out FILE` also writes the lines to FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from chardata import DEFAULT_DATA  # noqa: E402

# The fastest GPU recipe measured for Tiny Shakespeare, the shakespeare-gpu preset: shakespeare-char's model with
# Muon, twice the batch and a 1,000-step schedule. On an H200 it reached 1.47 at step 600 against 1,600 for
# shakespeare-char as it is; so short a run does not repay compiling (hardware.COMPILE_PAYS), which `auto` finds too.
TIME_TO_LOSS_ON_GPU = ["benchmarks/time_to_loss.py", "--preset", "shakespeare-gpu", "--target", "1.47"]
TIME_TO_LOSS_ON_GPU += ["--no-reference", "--eval-every", "100", "--set", "max_time=90", "--set", "compile=off"]

# (name, command, seconds allowed). Together they stay well under 10 minutes on an H200.
GPU_CHECKS = [
    ("machine", ["benchmarks/machine.py"], 60),
    ("cuda_tests", ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"], 240),
    ("train_speed", ["benchmarks/train_speed.py", "--preset", "shakespeare-char", "--steps", "60"], 120),
    (
        "train_speed",
        ["benchmarks/train_speed.py", "--preset", "gpt2", "--steps", "40", "--set", "grad_accum=1"],
        180,
    ),
    *[("time_to_loss", TIME_TO_LOSS_ON_GPU, 90)] * 3,  # three fresh processes: their median is the figure
    ("generate_speed", ["benchmarks/generate_speed.py", "--device", "cuda", "--compile"], 90),
]

# The same commands with tiny sizes, on the CPU: they prove the plumbing, not the speed.
DRY_RUN_CHECKS = [
    ("machine", ["benchmarks/machine.py"], 60),
    ("cuda_tests", ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py", "-k", "decoding"], 120),
    (
        "train_speed",
        ["benchmarks/train_speed.py", "--preset", "tiny", "--steps", "30", "--reference-steps", "3"],
        180,
    ),
    (
        "train_speed",
        ["benchmarks/train_speed.py", "--preset", "gpt2", "--steps", "30", "--reference-steps", "2"]
        + ["--set", "grad_accum=1", "--set", "batch_size=1", "--set", "context_length=64"]
        + ["--set", "n_layer=1", "--set", "bpe_vocab_size=2000"],
        300,
    ),
    (
        "time_to_loss",
        ["benchmarks/time_to_loss.py", "--preset", "tiny", "--target", "3.0", "--no-reference"]
        + ["--eval-every", "10", "--set", "max_time=60"],
        120,
    ),
    ("generate_speed", ["benchmarks/generate_speed.py", "--device", "cpu", "--reps", "1", "--decode", "4"], 120),
]


def run_check(name: str, args: list[str], seconds: int, env: dict) -> dict:
    """Run one check in its own process; its last JSON line, or what went wrong, as one record."""
    started = time.time()
    try:
        done = subprocess.run(
            [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=seconds
        )
    except subprocess.TimeoutExpired as e:
        return {"check": name, "ok": False, "error": f"over its {seconds} s limit", "tail": tail(e.stderr)}
    record = {"check": name, "ok": done.returncode == 0, "seconds": round(time.time() - started, 1)}
    if name == "cuda_tests":
        counts = re.findall(r"(\d+) (passed|failed|skipped|error)", done.stdout)
        record.update({kind: int(n) for n, kind in counts})
        record["failures"] = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    else:
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if lines:
            record["result"] = json.loads(lines[-1])
    if done.returncode != 0:
        record["tail"] = tail(done.stdout + done.stderr)
    return record


def tail(text: str | bytes | None, lines: int = 15) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-lines:])


def preflight(dry_run: bool) -> str | None:
    """Why the check cannot run here, or None."""
    if not DEFAULT_DATA.is_file():
        return (
            f"no Tiny Shakespeare at {DEFAULT_DATA}: set POTION_DATA, or copy ../shared/data into shared/data "
            "inside the project (that folder travels to a GPU machine with the working tree)"
        )
    import torch

    if not dry_run and not torch.cuda.is_available():
        return f"this torch ({torch.__version__}) sees no CUDA GPU; --dry-run runs the plumbing on the CPU"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="the same checks with tiny sizes on the CPU")
    ap.add_argument("--out", type=Path, help="also write the JSON lines to this file")
    ap.add_argument("--only", action="append", help="run only the checks of this name (repeatable)")
    args = ap.parse_args(argv)
    problem = preflight(args.dry_run)
    if problem:
        print(f"gpu-check: {problem}", file=sys.stderr)
        return 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.update(
        PYTHONUNBUFFERED="1", POTION_DATA=str(DEFAULT_DATA), POTION_TEST_DEVICE="cpu" if args.dry_run else "cuda"
    )
    records = []
    for name, command, seconds in DRY_RUN_CHECKS if args.dry_run else GPU_CHECKS:
        if args.only and name not in args.only:
            continue
        record = run_check(name, command, seconds, env)
        records.append(record)
        line = json.dumps(record)
        print(line, flush=True)
        if args.out:
            with args.out.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
    failed = [r["check"] for r in records if not r["ok"]]
    print(f"gpu-check: {len(records) - len(failed)} of {len(records)} checks ran cleanly", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
