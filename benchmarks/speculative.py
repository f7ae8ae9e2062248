"""Speculative decoding on a trained model: how many drafts the decoder keeps, and what that does to the speed.

For each temperature and each number of drafted tokens (0 = plain decoding, auto = potion's default), generates
--new-tokens tokens after a prompt, --reps times (seeds 1, 2, ...), and reports the median tokens/s, the
fraction of drafted tokens kept, and the tokens each check of the decoder produced. A model with random weights
keeps nearly every draft (its greedy output repeats a few tokens), so this is the benchmark that says what drafts
are worth on real text.

Usage (from the project root):
    python benchmarks/speculative.py --model runs/letters
    python benchmarks/speculative.py --model runs/letters --draft-tokens 0 2 4 6 --temperatures 0 0.8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from machine import emit, result  # noqa: E402

import potion  # noqa: E402
from potion.hardware import set_threads  # noqa: E402
from potion.infer import generate  # noqa: E402

PROMPT = "ROMEO:\nWhat light through yonder window breaks?\n"


class CheckCounter:
    """Wraps generate.check to count drafted and kept tokens."""

    def __init__(self):
        self.checks = self.drafted = self.kept = 0
        self.real = generate.check

    def __call__(self, logits, drafted, *rest):
        kept, replacement = self.real(logits, drafted, *rest)
        self.checks, self.drafted, self.kept = self.checks + 1, self.drafted + len(drafted), self.kept + kept
        return kept, replacement


def measure(model, prompt, n: int, temperature: float, drafts: int | None, reps: int) -> dict:
    counter = generate.check = CheckCounter()
    speeds = []
    try:
        for seed in range(reps + 1):  # the first run makes the decoding copies: not timed
            started = time.perf_counter()
            with torch.inference_mode():
                steps = generate.generate_tokens(
                    model,
                    prompt,
                    n,
                    temperature=temperature,
                    generator=torch.Generator().manual_seed(seed),
                    eot_id=None,
                    draft_tokens=drafts,
                )
                for _ in steps:
                    pass
            if seed > 0:
                speeds.append(n / (time.perf_counter() - started))
    finally:
        generate.check = counter.real
    return {
        "temperature": temperature,
        "draft_tokens": "auto" if drafts is None else drafts,
        "tokens_per_second": round(statistics.median(speeds), 1),
        "drafts_kept": round(counter.kept / counter.drafted, 3) if counter.drafted else None,
        "tokens_per_check": round((counter.kept + counter.checks) / counter.checks, 2) if counter.checks else None,
    }


def draft_count(text: str) -> int | None:
    return None if text == "auto" else int(text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a run directory or model folder")
    ap.add_argument("--new-tokens", type=int, default=300)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--draft-tokens", type=draft_count, nargs="+", default=[0, 2, 4, 6, None], help="numbers, or auto")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8])
    args = ap.parse_args(argv)

    threads = set_threads()
    model, tokenizer = potion.load(args.model)
    prompt = torch.tensor([tokenizer.encode(PROMPT)])
    rows = [
        measure(model, prompt, args.new_tokens, temperature, drafts, args.reps)
        for temperature in args.temperatures
        for drafts in args.draft_tokens
    ]
    emit(
        {
            **result("speculative", "cpu", next(model.parameters()).dtype, threads),
            "model": args.model,
            "parameters": model.num_parameters(),
            "new_tokens": args.new_tokens,
            "reps": args.reps,
            "rows": rows,
        }
    )


if __name__ == "__main__":
    main()
