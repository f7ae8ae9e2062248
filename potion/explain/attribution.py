"""Direct logit attribution: the target token's logit as a sum of what each head, MLP and embedding wrote.

The final norm's scale is frozen at its value in the real forward pass, which makes the logit linear in the
residual stream; the per-head outputs also give the check that the heads reproduce each block's attention output.
"""

from __future__ import annotations

import math

import torch

from potion.explain.forward import TracedForward
from potion.explain.schema import Candidate, LogitAttribution, LogitPart

LOGIT_ATTRIBUTION_NOTE = (
    "Direct logit attribution freezes the final norm's scale at its value in this forward pass, "
    "so the logit becomes a sum of parts; each part is only the direct effect of what that "
    "head, MLP or embedding wrote into the residual stream (what later layers make of it is "
    "counted in those layers)."
)


def head_outputs(attention, context: torch.Tensor) -> torch.Tensor:
    """context (H, T, D) -> (H, T, C): what each head writes, through its own columns of the output projection."""
    H, _, D = context.shape
    w = attention.proj.weight.double().view(-1, H, D)  # (C, H, D): proj input columns grouped by head
    return torch.einsum("htd,chd->htc", context.double(), w)


def heads_to_attention_output_error(model, trace: list[dict]) -> float:
    worst = 0.0
    for block, record in zip(model.blocks, trace):
        total = head_outputs(block.attn, record["context"][0]).sum(0)
        if block.attn.proj.bias is not None:
            total = total + block.attn.proj.bias.double()
        worst = max(worst, float((total - record["attn_out"][0].double()).abs().max()))
    return worst


def attribution(model, forward: TracedForward, focus: int, target: Candidate) -> tuple[LogitAttribution, float]:
    """The target's logit as a sum of parts, with the final norm's scale frozen from the real forward pass."""
    config = model.config
    token_id = forward.ids[focus]
    vectors: list[tuple[str, str, int, int, torch.Tensor]] = []
    token_vector = model.token_embedding.weight[token_id].double()
    vectors.append(("token embedding", "token_embedding", -1, -1, token_vector))
    if config.positions == "learned":
        vectors.append(
            ("position embedding", "position_embedding", -1, -1, model.position_embedding.weight[focus].double())
        )
    for layer, (block, record) in enumerate(zip(model.blocks, forward.trace)):
        per_head = head_outputs(block.attn, record["context"][0])[:, focus]  # (H, C)
        for h in range(config.n_head):
            vectors.append((f"layer {layer} head {h}", "head", layer, h, per_head[h]))
        if block.attn.proj.bias is not None:
            bias = block.attn.proj.bias.double()
            vectors.append((f"layer {layer} attention bias", "attention_bias", layer, -1, bias))
        vectors.append((f"layer {layer} MLP", "mlp", layer, -1, record["mlp_out"][0, focus].double()))

    residual = forward.final_residual[focus].double()
    parts_error = float((sum(v for *_, v in vectors) - residual).abs().max())
    norm = model.final_norm
    if isinstance(norm, torch.nn.LayerNorm):
        centre = True
        scale = 1.0 / math.sqrt(float(residual.var(unbiased=False)) + norm.eps)
    else:  # RMSNorm: no centring, no bias
        centre = False
        scale = 1.0 / math.sqrt(float(residual.square().mean()) + norm.eps)
    gain = norm.weight.double() if norm.weight is not None else torch.ones_like(residual)
    direction = model.head.weight[target.id].double()  # the unembedding row of the target token

    def through_norm(v: torch.Tensor) -> float:  # LayerNorm's centring is linear, so each part is centred alone
        v = v - v.mean() if centre else v
        return float(direction @ (gain * v * scale))

    parts = [LogitPart(name, kind, layer, head, through_norm(v)) for name, kind, layer, head, v in vectors]
    bias = getattr(norm, "bias", None)
    if bias is not None:
        parts.append(LogitPart("final norm bias", "norm_bias", -1, -1, float(direction @ bias.double())))
    logit = float(forward.raw_logits[focus, target.id])
    total = sum(p.contribution for p in parts)
    attribution = LogitAttribution(
        target, logit, tuple(parts), total, logit - total, config.logit_softcap, LOGIT_ATTRIBUTION_NOTE
    )
    return attribution, parts_error
