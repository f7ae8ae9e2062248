"""Loss, perplexity and bits per byte of a model on a stream of tokens (or on conversations, their reply tokens
alone), and the quick estimate training uses."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from tqdm import tqdm

from potion.data.chat import IGNORE
from potion.data.chat_batches import padded_batch
from potion.data.conversations import ConversationSpan
from potion.data.tokens import sequential_windows
from potion.hardware import autocast

# Small batches are evaluated several to a forward pass of at least this many tokens: per-call costs dominate them
# (tiny's 15 batches of 1,024 tokens took 150 ms one by one and 112 three at a time, on a CPU).
EVAL_PASS_TOKENS = 3072


@torch.no_grad()
def estimate_loss(model, batches: list, device: torch.device, dtype: torch.dtype) -> float:
    """Mean loss over fixed batches (of one shape), in training's precision: the figure logged at every evaluation.
    Batches of conversations (targets IGNORE outside the replies) give the mean over their reply tokens."""
    if any(bool((y == IGNORE).any()) for _, y in batches):
        return estimate_reply_loss(model, batches, device, dtype)
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


@torch.no_grad()
def estimate_reply_loss(model, batches: list, device: torch.device, dtype: torch.dtype) -> float:
    """The mean loss over every reply token of conversation batches (of several widths): each batch's mean counted
    once for each of its reply tokens. Batches of one width go through in one pass, as estimate_loss groups them."""
    model.eval()
    total, counted = torch.zeros((), device=device), 0
    for group in same_shape_groups(batches):
        x, y = torch.cat([x for x, _ in group]), torch.cat([y for _, y in group])
        n = int((y != IGNORE).sum())
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device))
        total += loss.float() * n
        counted += n
    model.train()
    return float(total) / max(counted, 1)


def same_shape_groups(batches: list) -> list[list]:
    """Consecutive batches of one shape, as many to a group as make EVAL_PASS_TOKENS."""
    groups = []
    for batch in batches:
        group = groups[-1] if groups else None
        if group and group[0][0].shape == batch[0].shape and (len(group) + 1) * batch[0].numel() <= EVAL_PASS_TOKENS:
            group.append(batch)
        else:
            groups.append([batch])
    return groups


def bytes_per_token(tokenizer, batches: list) -> float:
    """Mean UTF-8 bytes of the predicted tokens in fixed batches (a conversation's reply tokens): turns their loss
    into bits per byte."""
    byte_lengths = torch.from_numpy(tokenizer.token_byte_lengths())
    counts = [byte_lengths[y[y != IGNORE].cpu()] for _, y in batches]
    return float(torch.cat([c.flatten() for c in counts]).double().mean())


def bits_per_byte(loss: float, bytes_per_token: float) -> float:
    return loss / math.log(2) / bytes_per_token


@torch.no_grad()
def evaluate(model, tokenizer, tokens, batch_size: int = 16, quiet: bool = False) -> dict:
    """Mean next-token loss over non-overlapping context windows covering `tokens` (an array or a TokenSpan).

    bits_per_byte divides the total loss in bits by the UTF-8 bytes of the predicted text, which makes models
    with different tokenizers comparable. Conversations (a ConversationSpan) count their reply tokens alone.
    """
    if isinstance(tokens, ConversationSpan):
        return evaluate_conversations(model, tokenizer, tokens, batch_size, quiet)
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
    return figures(total_nats, total_tokens, total_bytes)


@torch.no_grad()
def evaluate_conversations(model, tokenizer, conversations: ConversationSpan, batch_size: int, quiet: bool) -> dict:
    """evaluate's figures over the reply tokens of every conversation, each cut to the model's context."""
    device = next(model.parameters()).device
    T = model.config.context_length
    byte_lengths = torch.from_numpy(tokenizer.token_byte_lengths())
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    model.eval()
    for start in tqdm(range(0, len(conversations), batch_size), desc="evaluating", disable=quiet, leave=False):
        stop = min(start + batch_size, len(conversations))
        rows = [row for i in range(start, stop) if len((row := conversations.conversation(i, T + 1))[0]) >= 2]
        if not rows:  # conversations of one token predict nothing
            continue
        x, y = padded_batch(rows, T, tokenizer.eot_id)
        logits, y = model(x.to(device)), y.to(device)
        nats = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        total_nats += float(nats)
        counted = y[y != IGNORE].cpu()
        total_tokens += counted.numel()
        total_bytes += int(byte_lengths[counted].sum())
    return figures(total_nats, total_tokens, total_bytes)


def figures(total_nats: float, total_tokens: int, total_bytes: int) -> dict:
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
