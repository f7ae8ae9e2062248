"""Character-level data for the benchmarks: one split, one batch sampler, one validation set.

Kept apart from any model so that the reference GPT and potion are trained on the same split
and judged on exactly the same validation tokens; a loss difference then means a model or
trainer difference, not a different sample of the text.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

PROJECT = Path(__file__).resolve().parent.parent


def default_data() -> Path:
    """Tiny Shakespeare: $POTION_DATA, else ../shared/data beside the project, else a shared/data inside it (the
    copy that travels to a GPU machine with the working tree; scripts/gpu-check says how to make it)."""
    if os.environ.get("POTION_DATA"):
        return Path(os.environ["POTION_DATA"])
    beside, inside = (root / "shared" / "data" / "tinyshakespeare.txt" for root in (PROJECT.parent, PROJECT))
    return inside if inside.is_file() and not beside.is_file() else beside


DEFAULT_DATA = default_data()


def load_chars(path: Path = DEFAULT_DATA):
    """(train ids, validation ids, vocab size): first 90% / last 10% of the file as uint16 ids.

    The vocabulary is every character of the whole file, sorted, as nanoGPT's shakespeare_char
    builds it, so ids match between programs that follow the same rule.
    """
    text = Path(path).read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((index[c] for c in text), dtype=np.uint16, count=len(text))
    split = int(0.9 * len(ids))
    return ids[:split], ids[split:], len(chars)


def sample_batch(ids: np.ndarray, batch: int, context: int, gen: torch.Generator, device="cpu"):
    """``batch`` windows at random offsets: inputs and the same windows shifted one character on."""
    starts = torch.randint(len(ids) - context, (batch,), generator=gen).tolist()
    windows = torch.from_numpy(np.stack([ids[s : s + context + 1] for s in starts]).astype(np.int64))
    return windows[:, :-1].to(device), windows[:, 1:].to(device)


def fixed_val_batches(val_ids: np.ndarray, n_batches: int, batch: int, context: int, seed: int, device="cpu"):
    """The same ``n_batches`` random validation batches for a given seed, every call, every program."""
    gen = torch.Generator().manual_seed(seed + 1)  # not the training stream's seed
    return [sample_batch(val_ids, batch, context, gen, device) for _ in range(n_batches)]


def val_windows(val_ids: np.ndarray, context: int, batch: int = 64, device="cpu"):
    """The whole validation split as non-overlapping windows, in batches: the unsampled figure.

    Yields (inputs, targets); the last batch may be short, so weight losses by batch length.
    """
    n = (len(val_ids) - 1) // context
    x = torch.from_numpy(val_ids[: n * context].astype(np.int64)).view(n, context)
    y = torch.from_numpy(val_ids[1 : n * context + 1].astype(np.int64)).view(n, context)
    for i in range(0, n, batch):
        yield x[i : i + batch].to(device), y[i : i + batch].to(device)
