"""The attention numbers of one traced forward pass: for the focus token, every head's weights over the earlier
tokens with the raw q.k, the scaled score and the size of each value, a worked example of one query/key pair, the
layer averages; and, for short prompts, every token's rows (the matrices the page draws)."""

from __future__ import annotations

import math

import torch

from potion.explain.schema import AttentionMatrices, AverageKey, HeadAttention, HeadAverage, KeyWeight, WorkedExample
from potion.model.shapes import Shapes

WORKED_ENTRIES = 4  # vector entries spelled out in the worked example; the rest are summed as "more terms"
MATRIX_BUDGET = 200_000  # numbers (weights + scores) in the all-tokens attention matrices; beyond it: focus only
NEXT_BY_POSITION = 3  # candidates kept for every position's own next-token guess (when matrices are included)
EXP_LIMIT = 80.0  # the worked example shows plain exp(score) unless a scaled score is this large


def head_attention(config, record: dict, layer: int, head: int, focus: int, tokens, top_k: int) -> HeadAttention:
    weights = record["weights"][0, head, focus, : focus + 1].double()  # visible keys only: 0..focus
    scores = record["scores"][0, head, focus, : focus + 1].double()
    scaled = record["scaled_scores"][0, head, focus, : focus + 1].double()
    value_norms = record["value"][0, head, : focus + 1].double().norm(dim=-1)
    order = weights.argsort(descending=True, stable=True)
    keys = tuple(
        KeyWeight(
            int(j),
            tokens[j].label,
            float(scores[j]),
            float(scaled[j]),
            float(weights[j]),
            float(value_norms[j]),
            float(weights[j] * value_norms[j]),
        )
        for j in order[:top_k]
    )
    listed = sum(k.weight for k in keys)
    row_sum = float(weights.sum())
    worked = worked_example(config, record, head, focus, int(order[0]), scaled)
    return HeadAttention(layer, head, rounded(weights), keys, max(row_sum - listed, 0.0), row_sum, worked)


def worked_example(config, record, head: int, focus: int, key: int, scaled_row: torch.Tensor) -> WorkedExample:
    q = record["query"][0, head, focus].double()
    k = record["key"][0, head, key].double()
    n = min(WORKED_ENTRIES, q.numel())
    products = q * k
    dot = float(products.sum())
    scale = math.sqrt(Shapes.of(config).head_dim)
    shift = float(scaled_row.max()) if float(scaled_row.max()) > EXP_LIMIT else 0.0
    exps = (scaled_row - shift).exp()
    steps = [
        name
        for name, used in (
            ("their per-head RMS norm", config.qk_norm),
            ("the rotary position rotation", config.positions == "rope"),
        )
        if used
    ]
    note = f"q and k after {' and '.join(steps)}" if steps else ""
    return WorkedExample(
        query_index=focus,
        key_index=key,
        head_dim=q.numel(),
        query_entries=tuple(q[:n].tolist()),
        key_entries=tuple(k[:n].tolist()),
        products=tuple(products[:n].tolist()),
        rest_of_dot_product=float(products[n:].sum()),
        dot_product=dot,
        score=float(record["scores"][0, head, focus, key]),
        scale=scale,
        scaled_score=dot / scale,
        shift=shift,
        exp_score=float(exps[key]),
        exp_sum=float(exps.sum()),
        weight=float(exps[key] / exps.sum()),
        note=note,
    )


def head_average(record: dict, layer: int, focus: int, tokens, top_k: int) -> HeadAverage:
    weights = record["weights"][0, :, focus, : focus + 1].double()  # (H, focus + 1)
    value_norms = record["value"][0, :, : focus + 1].double().norm(dim=-1)  # (H, focus + 1)
    mean_weight, mean_norm = weights.mean(0), value_norms.mean(0)
    mean_weighted = (weights * value_norms).mean(0)
    order = mean_weight.argsort(descending=True, stable=True)[:top_k]
    keys = tuple(
        AverageKey(int(j), tokens[j].label, float(mean_weight[j]), float(mean_norm[j]), float(mean_weighted[j]))
        for j in order
    )
    label = f"average of the {weights.size(0)} heads (a summary, not a step the model computes)"
    return HeadAverage(layer, label, rounded(mean_weight), keys, max(1.0 - sum(k.weight for k in keys), 0.0))


def rounded(row: torch.Tensor, digits: int = 5) -> tuple[float, ...]:
    """Whole rows are for pictures; five decimals keep the JSON small and are finer than any colour step."""
    return tuple(round(x, digits) for x in row.tolist())


def all_matrices(
    config, trace: list[dict], logits: torch.Tensor, tokens, focus: int, top_candidates
) -> tuple[AttentionMatrices | None, str]:
    """Every token's attention rows, when they fit the budget; else None and a note saying why."""
    T = len(tokens)
    per_token_pair = 2 * config.n_layer * config.n_head  # a weight and a score per layer and head

    def fits(t: int) -> bool:
        return per_token_pair * t * (t + 1) // 2 <= MATRIX_BUDGET

    if not fits(T):
        longest = max((t for t in range(1, T) if fits(t)), default=0)
        return None, (
            f"every token's attention is included for prompts of up to {longest} tokens with this model; "
            f"this prompt has {T}, so only token {focus} is shown (choose another with --token)"
        )

    def lower_triangles(name: str, digits: int):  # query i sees keys 0..i
        return tuple(
            tuple(
                tuple(tuple(round(x, digits) for x in record[name][0, h, i, : i + 1].tolist()) for i in range(T))
                for h in range(config.n_head)
            )
            for record in trace
        )

    value_norms = tuple(
        tuple(tuple(round(x, 4) for x in record["value"][0, h].norm(dim=-1).tolist()) for h in range(config.n_head))
        for record in trace
    )
    guesses = tuple(top_candidates(logits[i], NEXT_BY_POSITION) for i in range(T))
    return AttentionMatrices(lower_triangles("weights", 5), lower_triangles("scores", 4), value_norms, guesses), ""
