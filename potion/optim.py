"""Optimizers and the learning-rate schedule.

Weight decay is decoupled (AdamW) and applies to matrices only: embeddings and linear weights, never biases or
norm gains. The schedule is a pure function of the step, so a resumed run picks it up exactly.
"""

from __future__ import annotations

import inspect
import math

import torch

from .config import TrainConfig


def learning_rate_at(step: int, config: TrainConfig, peak: float | None = None) -> float:
    """Linear warmup, then cosine decay (or a flat stretch and a linear decay: wsd) down to a floor."""
    peak = config.learning_rate if peak is None else peak
    floor = peak * config.min_lr_ratio
    total = max(config.max_steps, 1)
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.schedule == "wsd":
        decay_start = total - int(config.decay_fraction * total)
        if step < decay_start:
            return peak
        progress = min((step - decay_start) / max(total - decay_start, 1), 1.0)
        return peak + (floor - peak) * progress
    progress = min((step - config.warmup_steps) / max(total - config.warmup_steps, 1), 1.0)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (2-D and up) decay; vectors (biases, norm gains) do not. Tied weights appear once."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() already yields a tied matrix only once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "matrices"},
        {"params": no_decay, "weight_decay": 0.0, "name": "vectors"},
    ]


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device_type: str) -> list[torch.optim.Optimizer]:
    """A list of optimizers stepped together (one for AdamW; Muon adds a second for the hidden matrices)."""
    groups = parameter_groups(model, config.weight_decay)
    for g in groups:
        g["peak_lr"] = config.learning_rate
    fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
    adamw = torch.optim.AdamW(
        groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), fused=fused or None
    )
    return [adamw]


def set_learning_rate(optimizers: list[torch.optim.Optimizer], step: int, config: TrainConfig) -> float:
    """Each group follows the schedule scaled to its own peak; returns the AdamW rate for the log."""
    first = None
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = learning_rate_at(step, config, g["peak_lr"])
            first = g["lr"] if first is None else first
    return first
