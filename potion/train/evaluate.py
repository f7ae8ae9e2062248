"""Loss, perplexity and bits per byte of a model on a stream of tokens, and the quick estimate training uses."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from tqdm import tqdm

from potion.data.tokens import sequential_windows
from potion.hardware import autocast

# Small batches are evaluated several to a forward pass of at least this many tokens: per-call costs dominate them
# (tiny's 15 batches of 1,024 tokens took 150 ms one by one and 112 three at a time, on a CPU).
EVAL_PASS_TOKENS = 3072


@torch.no_grad()
def estimate_loss(model, batches: list, device: torch.device, dtype: torch.dtype) -> float:
    """Mean loss over fixed batches (of one shape), in training's precision: the figure logged at every evaluation."""
    model.eval()
    per_pass = max(1, EVAL_PASS_TOKENS // batches[0][0].numel())
    total = torch.zeros((), device=device)
    for i in range(0, len(batches), per_pass):
        group = batches[i : i + per_pass]
        x, y = torch.cat([x for x, _ in group]), torch.cat([y for _, y in group])
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device))
        total += loss.float() * len(group)  # the mean of the group's batches, counted once for each
    model.train()
    return float(total) / len(batches)


def bytes_per_token(tokenizer, batches: list) -> float:
    """Mean UTF-8 bytes of the predicted tokens in fixed batches: turns their loss into bits per byte."""
    byte_lengths = torch.from_numpy(tokenizer.token_byte_lengths())
    counts = [byte_lengths[y.cpu()] for _, y in batches]
    return float(torch.cat([c.flatten() for c in counts]).double().mean())


def bits_per_byte(loss: float, bytes_per_token: float) -> float:
    return loss / math.log(2) / bytes_per_token


@torch.no_grad()
def evaluate(model, tokenizer, tokens, batch_size: int = 16, quiet: bool = False) -> dict:
    """Mean next-token loss over non-overlapping context windows covering `tokens` (an array or a TokenSpan).

    bits_per_byte divides the total loss in bits by the UTF-8 bytes of the predicted text, which makes models
    with different tokenizers comparable.
    """
    device = next(model.parameters()).device
    T = model.config.context_length
    byte_lengths = torch.from_numpy(tokenizer.token_byte_lengths())
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    windows = sequential_windows(tokens, T)  # read a group at a time: a big split never sits in memory whole
    n_groups = math.ceil(len(range(0, len(tokens) - 1, T)) / batch_size)
    model.eval()
    for _ in tqdm(range(n_groups), desc="evaluating", disable=quiet, leave=False):
        group = list(itertools.islice(windows, batch_size))
        for x, y in _same_length_runs(group):
            x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
            logits = model(x)
            nats = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            total_nats += float(nats)
            total_tokens += y.numel()
            total_bytes += int(byte_lengths[y.cpu()].sum())
    loss = total_nats / max(total_tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700)),
        "bits_per_byte": bits_per_byte(total_nats, max(total_bytes, 1)),
        "tokens": total_tokens,
    }


def _same_length_runs(group):
    """Stack windows of equal length (only the last window of a stream is shorter)."""
    full = [w for w in group if len(w[0]) == len(group[0][0])]
    rest = [w for w in group if len(w[0]) != len(group[0][0])]
    for part in (full, rest):
        if part:
            yield np.stack([w[0] for w in part]), np.stack([w[1] for w in part])
