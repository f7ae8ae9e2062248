"""One forward pass of the prompt with every attention step recorded (potion.model.record), and the logits that
generation computes for the same prompt, to check the two agree."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from potion.errors import PotionError
from potion.model.record import recording


@dataclass
class TracedForward:
    """One forward pass through the explicit attention path; tensors stay here, numbers go to the Explanation."""

    ids: list[int]
    logits: torch.Tensor  # (T, V), after any softcap: what sampling sees
    raw_logits: torch.Tensor  # (T, V) before the softcap
    trace: list[dict]  # one dict per block, see potion.model.record
    final_residual: torch.Tensor  # (T, C): the residual stream after the last block, before the final norm


@torch.no_grad()
def trace_forward(model, ids: list[int]) -> TracedForward:
    idx = torch.tensor([ids], dtype=torch.long, device=model_device(model))
    with recording(model) as trace:
        logits = model(idx)[0].float()
    if not bool(torch.isfinite(logits).all()):
        raise PotionError(
            "the model's next-token scores for this prompt are not finite numbers (NaN or inf): its weights are "
            "damaged or too large"
        )
    last = trace[-1]
    final_residual = (last["residual_in"] + last["attn_out"] + last["mlp_out"])[0]  # the block's own sum order
    raw = model.head(model.final_norm(final_residual)).float()
    return TracedForward(ids, logits, raw, trace, final_residual)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_logits(model, ids: list[int]) -> torch.Tensor:
    """The logits after ids exactly as generation computes them: prefill on a fresh KV cache."""
    from potion.infer.generate import prefill

    idx = torch.tensor([ids], dtype=torch.long, device=model_device(model))
    return prefill(model, idx, model.new_cache(1))[0].float()
