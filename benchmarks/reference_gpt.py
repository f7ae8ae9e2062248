"""A plain PyTorch GPT in the nanoGPT recipe, as the yardstick potion's own trainer is measured against.

GPT-2 style: pre-LayerNorm blocks with bias, causal self-attention through
F.scaled_dot_product_attention, a 4x GELU MLP, learned positions, an output layer tied to the
token embedding, dropout; AdamW, fp32, eager mode, batches cut at random offsets from a uint16
array of character ids. Deliberately nothing clever: it is the baseline, not the product.

Usage (from the project root):
    python benchmarks/reference_gpt.py --mode speed --n-layer 6 --n-head 6 --n-embd 384 \\
        --context 256 --batch 64 --dropout 0.2 --steps 20
    python benchmarks/reference_gpt.py --mode time-to-loss --target 1.90
Each prints one JSON line.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from chardata import DEFAULT_DATA, fixed_val_batches, load_chars, sample_batch, val_windows
from machine import emit, matmul_peak, physical_cores, result, synchronize

from potion.hardware import DTYPES  # the precisions potion trains in, by the names its config uses


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        assert n_embd % n_head == 0
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout)
        )

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ReferenceGPT(nn.Module):
    def __init__(self, vocab_size: int, n_layer: int, n_head: int, n_embd: int, context: int, dropout: float = 0.0):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(context, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied: one matrix reads and writes characters
        self.apply(self._init_weights)
        # GPT-2: shrink the layers that write into the residual stream so its variance does not
        # grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        # Position table excluded, as nanoGPT counts; the tied matrix is counted once.
        return sum(p.numel() for p in self.parameters()) - self.pos_emb.weight.numel()

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        x = self.drop(self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, fused: bool = False):
    # Decay only matrices (weights, embeddings), not biases or LayerNorm gains, as nanoGPT does.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=fused or None)


def cosine_lr(step: int, lr: float, warmup: int, decay_steps: int, min_lr: float) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay to min_lr at decay_steps, flat after."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup) / max(1, decay_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def train_reference(
    model,
    train_ids,
    *,
    steps,
    batch,
    context,
    lr_at,
    device="cpu",
    seed=0,
    grad_clip=1.0,
    eval_every=0,
    eval_fn=None,
    stop=None,
    clock_start=None,
    dtype=torch.float32,
):
    """Train ``steps`` optimizer steps; return per-step seconds and the evaluations made.

    ``eval_fn()`` (if given) runs at step 0, every ``eval_every`` steps and after the last step;
    its time is kept out of ``train_seconds``. ``stop(step, loss)`` returning True ends training
    early. Step timings include batch sampling, since a real trainer pays for that too. dtype bf16 runs the
    forward pass under autocast (the GPU recipe: bf16, compiled, fused AdamW).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, lr_at(0), fused=torch.device(device).type == "cuda")
    device_type = torch.device(device).type
    step_seconds, evals = [], []
    t_start = time.perf_counter() if clock_start is None else clock_start  # wall_seconds count from here

    def evaluate(step):
        model.eval()
        loss = eval_fn()
        model.train()
        evals.append(
            {
                "step": step,
                "val_loss": loss,
                "train_seconds": sum(step_seconds),
                "wall_seconds": time.perf_counter() - t_start,
            }
        )
        return stop is not None and stop(step, loss)

    model.train()
    if eval_fn is not None and evaluate(0):
        return step_seconds, evals
    for step in range(1, steps + 1):
        synchronize(device)
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1)
        x, y = sample_batch(train_ids, batch, context, gen, device)
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        synchronize(device)
        step_seconds.append(time.perf_counter() - t0)
        if eval_fn is not None and (step % eval_every == 0 or step == steps) and evaluate(step):
            break
    return step_seconds, evals


def fixed_eval_fn(model, val_ids, n_batches, batch, context, seed, device):
    """Mean loss over the same validation batches every time, so evaluations differ only by the model."""
    batches = fixed_val_batches(val_ids, n_batches, batch, context, seed, device)
    return torch.no_grad()(lambda: statistics.fmean(model(x, y)[1].item() for x, y in batches))


@torch.no_grad()
def full_val_loss(model, val_ids, context, device):
    model.eval()
    pairs = [(model(x, y)[1].item(), len(x)) for x, y in val_windows(val_ids, context, device=device)]
    model.train()
    return sum(loss * n for loss, n in pairs) / sum(n for _, n in pairs)


# (flag, type, default, help). Defaults are nanoGPT's shakespeare_char CPU recipe, the
# time-to-loss setting; the speed mode is normally given the bigger shape on the command line.
OPTIONS = [
    ("--threads", int, physical_cores(), "torch threads (default: physical cores)"),
    ("--seed", int, 1337, None),
    ("--n-layer", int, 4, None),
    ("--n-head", int, 4, None),
    ("--n-embd", int, 128, None),
    ("--context", int, 64, None),
    ("--batch", int, 12, None),
    ("--dropout", float, 0.0, None),
    ("--lr", float, 1e-3, None),
    ("--min-lr", float, 1e-4, None),
    ("--warmup-steps", int, 100, "time-to-loss: linear lr warmup steps"),
    ("--steps", int, None, "speed: timed steps (20); time-to-loss: max steps (2000)"),
    ("--target", float, 1.90, "time-to-loss: validation loss to reach"),
    ("--eval-every", int, 50, None),
    ("--eval-batches", int, 20, "time-to-loss: fixed validation batches per evaluation"),
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["speed", "time-to-loss"], required=True)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="speed: bf16 autocast (the GPU recipe)")
    ap.add_argument("--compile", action="store_true", help="speed: torch.compile the model (the GPU recipe)")
    ap.add_argument("--vocab-size", type=int, help="speed: this many token ids (default: the file's characters)")
    for flag, typ, default, help_ in OPTIONS:
        ap.add_argument(flag, type=typ, default=default, help=help_)
    ap.add_argument("--stop-at-target", action="store_true", help="end training once the target is reached")
    return ap.parse_args(argv)


def run_speed(args, model, train_ids, tokens_per_step):
    steps, warmup = args.steps or 20, 2  # first steps pay for allocator growth and kernel choice
    secs, _ = train_reference(
        model,
        train_ids,
        steps=warmup + steps,
        batch=args.batch,
        context=args.context,
        lr_at=lambda s: args.lr,
        device=args.device,
        seed=args.seed,
        dtype=DTYPES[args.dtype],
    )
    timed = secs[warmup:]
    median = statistics.median(timed)
    peak = matmul_peak(args.device, DTYPES[args.dtype])
    # Training FLOPs per token: 6 per parameter (forward + backward) plus attention scores.
    flops_per_token = 6 * model.num_params() + 6 * args.n_layer * args.n_embd * args.context
    return dict(
        steps_timed=steps,
        warmup_steps=warmup,
        ms_per_step=round(median * 1e3, 2),
        ms_per_step_min=round(min(timed) * 1e3, 2),
        ms_per_step_max=round(max(timed) * 1e3, 2),
        tokens_per_second=round(tokens_per_step / median, 1),
        model_tflops=round(flops_per_token * tokens_per_step / median / 1e12, 4),
        **{f"matmul_peak_tflops_{args.dtype}": round(peak.tflops, 4), f"matmul_peak_size_{args.dtype}": peak.size},
    )


def run_time_to_loss(args, model, train_ids, val_ids, tokens_per_step, clock_start):
    steps = args.steps or 2000
    eval_fn = fixed_eval_fn(model, val_ids, args.eval_batches, args.batch, args.context, args.seed, args.device)
    reached = []  # the first evaluated step at or under the target

    def stop(step, loss):
        if loss <= args.target and not reached:
            reached.append(step)
        return bool(reached) and args.stop_at_target

    secs, evals = train_reference(
        model,
        train_ids,
        steps=steps,
        batch=args.batch,
        context=args.context,
        lr_at=lambda s: cosine_lr(s, args.lr, args.warmup_steps, steps, args.min_lr),
        device=args.device,
        seed=args.seed,
        eval_every=args.eval_every,
        eval_fn=eval_fn,
        stop=stop,
        clock_start=clock_start,
    )
    hit = next((e for e in evals if reached and e["step"] == reached[0]), None)
    return dict(
        target=args.target,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_steps=args.warmup_steps,
        max_steps=steps,
        steps_run=len(secs),
        eval_every=args.eval_every,
        eval_set=f"{args.eval_batches} fixed batches x {args.batch} x {args.context} tokens "
        f"from the last 10% of the file",
        reached_target=hit is not None,
        step_to_target=hit and hit["step"],
        tokens_to_target=hit and hit["step"] * tokens_per_step,
        seconds_to_target_wall=hit and round(hit["wall_seconds"], 3),
        seconds_to_target_train=hit and round(hit["train_seconds"], 3),
        final_val_loss=round(evals[-1]["val_loss"], 4),
        best_val_loss=round(min(e["val_loss"] for e in evals), 4),
        final_val_loss_full_split=round(full_val_loss(model, val_ids, args.context, args.device), 4),
        train_seconds_total=round(sum(secs), 3),
        wall_seconds_total=round(evals[-1]["wall_seconds"], 3),
        ms_per_step=round(statistics.median(secs) * 1e3, 3) if secs else None,
    )  # none if the target was met at step 0


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    t0 = time.perf_counter()  # time to loss counts from here: data, model and optimizer set-up included
    train_ids, val_ids, vocab = load_chars(args.data)
    vocab = args.vocab_size or vocab
    data_seconds = time.perf_counter() - t0
    model = ReferenceGPT(vocab, args.n_layer, args.n_head, args.n_embd, args.context, args.dropout).to(args.device)
    record = {
        **result(f"reference_gpt.{args.mode}", args.device, DTYPES[args.dtype]),
        "compile": args.compile,
        "n_layer": args.n_layer,
        "n_head": args.n_head,
        "n_embd": args.n_embd,
        "context": args.context,
        "batch": args.batch,
        "dropout": args.dropout,
        "vocab_size": vocab,
        "params": model.num_params(),
        "data_seconds": round(data_seconds, 4),
        "seed": args.seed,
    }
    tokens_per_step = args.batch * args.context
    if args.mode == "speed":
        record.update(run_speed(args, torch.compile(model) if args.compile else model, train_ids, tokens_per_step))
    else:
        record.update(run_time_to_loss(args, model, train_ids, val_ids, tokens_per_step, t0))
    emit(record)


if __name__ == "__main__":
    main()
