"""Sample efficiency: validation loss at a fixed token budget for each recipe change on its own, and together.

Every run trains potion's `tiny` shape on Tiny Shakespeare (character level) for the same number of steps and
tokens, from the same seed, evaluated on the same fixed validation batches; the baseline is the GPT-2 recipe
(learned positions, LayerNorm, GELU, biases, tied head, AdamW, cosine schedule). Each other row switches on one
config field (or a pair that only makes sense together), and the last rows switch on the chosen combination.
Threads are pinned to --threads so that runs do not compete; the figure is the loss, not the time.

Usage (from the project root):
    python benchmarks/ablation.py --steps 300
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from chardata import DEFAULT_DATA  # noqa: E402
from machine import emit, result  # noqa: E402

from potion.config import resolve  # noqa: E402
from potion.hardware import pick_dtype  # noqa: E402
from potion.train.loop import train  # noqa: E402

BASELINE = [
    "positions=learned",
    "norm=layernorm",
    "mlp_activation=gelu",
    "bias=true",
    "qk_norm=false",
    "tie_embeddings=true",
    "zero_init_proj=false",
    "zero_init_head=false",
    "logit_softcap=0",
    "value_embeddings=false",
    "optimizer=adamw",
    "schedule=cosine",
]
CHANGES = {
    "baseline (GPT-2 recipe, AdamW)": [],
    "rope": ["positions=rope"],
    "rmsnorm": ["norm=rmsnorm"],
    "relu2": ["mlp_activation=relu2"],
    "qk_norm": ["qk_norm=true"],
    "zero_init_proj": ["zero_init_proj=true"],
    "untied zero-init head": ["tie_embeddings=false", "zero_init_head=true"],
    "logit_softcap=15": ["logit_softcap=15"],
    "value_embeddings": ["value_embeddings=true"],
    "muon": ["optimizer=muon"],
    "wsd schedule": ["schedule=wsd"],
}
COMBINATION = ["positions=rope", "norm=rmsnorm", "mlp_activation=relu2", "bias=false", "qk_norm=true", "optimizer=muon"]


def run(name: str, changes: list[str], steps: int, common: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = resolve(
            "tiny",
            None,
            [
                f"data={DEFAULT_DATA}",
                f"max_steps={steps}",
                f"eval_every={steps}",
                "max_time=0",
                "sample_tokens=0",
                "stop_at_loss=0",
                *common,
                *BASELINE,
                *changes,
            ],
        )
        started = time.time()
        summary = train(config, out=Path(tmp) / "run", quiet=True)
    return {
        "benchmark": "ablation",
        "change": name,
        "fields": changes,
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "val_loss": round(summary["val_loss"], 4),
        "train_loss": round(summary["train_loss"], 4),
        "seconds": round(time.time() - started, 1),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applied to every run")
    ap.add_argument("--only", action="append", help="run only these rows (names as printed)")
    args = ap.parse_args(argv)
    common = ["eval_batches=20", *args.set]
    rows = {**CHANGES, "chosen combination": COMBINATION, "chosen combination + wsd": [*COMBINATION, "schedule=wsd"]}
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # potion.hardware.set_threads gives each run this many
    torch.set_num_threads(args.threads)  # so that the machine description says so too
    emit(
        {
            **result("ablation", "cpu", pick_dtype("auto", torch.device("cpu")), args.threads),
            "steps": args.steps,
            "common": common,
            "baseline": BASELINE,
        }
    )
    for name, changes in rows.items():
        if args.only and name not in args.only:
            continue
        emit(run(name, changes, args.steps, common))


if __name__ == "__main__":
    main()
