"""Time to quality: wall-clock seconds until the validation loss first reaches a target, from a cold start.

potion's trainer runs a preset to --target, stopping there (train.stop_at_loss), evaluating every --eval-every
steps; then the reference (benchmarks/reference_gpt.py in its default CPU recipe: 4 layers, 4 heads, 128 wide,
64 context, batch 12, fp32, AdamW lr 1e-3, 2,000 steps, evaluated every 50 steps) runs to --reference-target;
then potion runs once more. Small shared machines drift in speed by ±20% within minutes; timing potion before
and after the reference and taking the mean centres both measurements on the same moment, so a steady drift
cancels out of the ratio; each run is quoted on its own too, and each runs in a fresh process. Both clocks start
once torch is imported and include everything after: reading the data, building the model and optimizer,
evaluation (and potion's compile, if on), so the figure is what a person waits. Evaluation
is the same work on both sides: the validation split only (potion: eval_train_split=false), the same number of
tokens (potion's batch count is scaled to its batch size), fixed batches from the last 10% of Tiny Shakespeare.

Usage (from the project root):
    python benchmarks/time_to_loss.py --preset tiny --target 1.88
    python benchmarks/time_to_loss.py --preset shakespeare-fast --target 1.50 --no-reference --eval-every 250
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from chardata import DEFAULT_DATA  # noqa: E402
from machine import emit, read_log, result, run_json  # noqa: E402

from potion.config import resolve  # noqa: E402
from potion.hardware import pick_device, pick_dtype  # noqa: E402
from potion.train.loop import train  # noqa: E402


def reference_time_to_loss(target: float, threads: int) -> dict:
    cmd = [
        sys.executable,
        str(HERE / "reference_gpt.py"),
        "--mode",
        "time-to-loss",
        "--target",
        str(target),
        "--threads",
        str(threads),
        "--stop-at-target",
    ]
    return run_json(cmd)


REFERENCE_EVAL_TOKENS = 20 * 12 * 64  # reference_gpt.py's validation set: 20 batches of 12 x 64


def potion_time_to_loss(preset: str, target: float, eval_every: int, overrides: list[str]) -> tuple:
    with tempfile.TemporaryDirectory() as tmp:
        shape = resolve(preset, None, overrides)
        eval_batches = max(1, round(REFERENCE_EVAL_TOKENS / (shape.train.batch_size * shape.model.context_length)))
        config = resolve(
            preset,
            None,
            [
                f"data={DEFAULT_DATA}",
                f"eval_every={eval_every}",
                "sample_tokens=0",
                f"stop_at_loss={target}",
                f"eval_batches={eval_batches}",
                "eval_train_split=false",
                *overrides,
            ],
        )
        launched = time.time()
        summary = train(config, out=Path(tmp) / "run", quiet=True)
        wall = time.time() - launched
        rows = read_log(Path(tmp) / "run")
    evals = [r for r in rows if r["kind"] == "eval"]
    hit = next((r for r in evals if r["val_loss"] <= target), None)
    return config, {
        "reached_target": hit is not None,
        "step_to_target": hit and hit["step"],
        "tokens_to_target": hit and hit["tokens"],
        "seconds_to_target_wall": hit and hit["elapsed"],
        "seconds_to_target_train": hit and hit["train_seconds"],
        "best_val_loss": round(min(r["val_loss"] for r in evals), 4),
        "steps_run": summary["steps"],
        "wall_seconds_total": round(wall, 2),
        "evaluations": [(r["step"], round(r["val_loss"], 4), r["elapsed"]) for r in evals],
    }


def potion_in_a_fresh_process(args) -> dict:
    """A potion run in its own process, so that each one starts as cold as the reference does."""
    cmd = [
        sys.executable,
        __file__,
        "--no-reference",
        "--preset",
        args.preset,
        "--target",
        str(args.target),
        "--eval-every",
        str(args.eval_every),
        *(f"--set={o}" for o in args.set),
    ]
    return run_json(cmd)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--target", type=float, default=1.88)
    ap.add_argument("--reference-target", type=float, default=1.90)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for potion's run")
    ap.add_argument("--no-reference", action="store_true", help="time potion alone, once, in this process")
    args = ap.parse_args(argv)

    if args.no_reference:
        config, figures = potion_time_to_loss(args.preset, args.target, args.eval_every, args.set)
        device = pick_device(config.train.device)
        m, t = config.model, config.train
        emit(
            {
                **result("time_to_loss", device, pick_dtype(t.dtype, device)),
                "preset": args.preset,
                "overrides": args.set,
                "target": args.target,
                "shape": f"{m.n_layer}L/{m.n_head}H/{m.n_embd}, context {m.context_length}, batch {t.batch_size}",
                "optimizer": t.optimizer,
                "compile": t.compile,
                **{f"potion_{k}": v for k, v in figures.items()},
            }
        )
        return

    before = potion_in_a_fresh_process(args)
    ref = reference_time_to_loss(args.reference_target, torch.get_num_threads())
    after = potion_in_a_fresh_process(args)
    record = {k: v for k, v in before.items() if not k.startswith("potion_") and k != "load_avg_1m_end"}
    record.update({k.replace("potion_", "potion_before_", 1): v for k, v in before.items() if k.startswith("potion_")})
    record.update(
        {
            f"potion_after_{k}": after[f"potion_{k}"]
            for k in ("reached_target", "step_to_target", "seconds_to_target_wall", "best_val_loss")
        }
    )
    record.update(
        reference_target=args.reference_target,
        reference_reached=ref["reached_target"],
        reference_seconds_to_target_wall=ref["seconds_to_target_wall"],
        reference_step_to_target=ref["step_to_target"],
        reference_best_val_loss=ref["best_val_loss"],
    )
    if before["potion_reached_target"] and after["potion_reached_target"] and ref["reached_target"]:
        mean = (before["potion_seconds_to_target_wall"] + after["potion_seconds_to_target_wall"]) / 2
        record["potion_mean_seconds_to_target_wall"] = round(mean, 2)
        record["speedup"] = round(ref["seconds_to_target_wall"] / mean, 2)
    emit(record)


if __name__ == "__main__":
    main()
