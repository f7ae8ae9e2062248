"""Look inside one prediction: the data behind `potion explain`.

explain(model, tokenizer, prompt) runs the prompt once through the model's explicit attention path
(GPT.forward(idx, trace=[])) and gathers, for one focus token (default: the last):

  - the next-token prediction (top-k, and the rank of an expected token);
  - its attention in every layer and head: the earlier tokens ranked by weight, with the raw q.k, the scaled
    score, the softmax weight and the size of what each key passes on (|value|), plus a worked example;
  - the logit lens: what the model would predict if it stopped after each layer;
  - what mattered for the target token: occlusion (drop one earlier token, run again) and direct logit
    attribution (the logit as a sum of what each head, MLP and embedding wrote into the residual stream);
  - checks that the numbers are the model's own (rows sum to 1, heads -> proj == attn_out, the logits equal
    the ones generation uses).

Everything lands in one frozen, JSON-serialisable Explanation (schema.py, with its files); the renderers
(text.py, html.py, plot.py) only read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PotionError
from .attribution import LOGIT_ATTRIBUTION_NOTE, attribution, heads_to_attention_output_error
from .schema import (
    FORMAT,
    AttentionMatrices,
    AverageKey,
    Candidate,
    Checks,
    Expected,
    Explanation,
    HeadAttention,
    HeadAverage,
    KeyWeight,
    LensLayer,
    ModelSummary,
    OcclusionEffect,
    Token,
    WorkedExample,
    probe_path,
    save_json,
    visible,
)

WORKED_ENTRIES = 4  # vector entries spelled out in the worked example; the rest are summed as "more terms"
MATRIX_BUDGET = 200_000  # numbers (weights + scores) in the all-tokens attention matrices; beyond it: focus only
NEXT_BY_POSITION = 3  # candidates kept for every position's own next-token guess (when matrices are included)
OCCLUSION_BATCH = 32  # sequences per forward pass when dropping tokens one at a time
EXP_LIMIT = 80.0  # the worked example shows plain exp(score) unless a scaled score is this large

ATTENTION_CAVEAT = ("Attention weights show where each token read from, not by themselves why the model predicts "
                    "what it does: values, MLPs and later layers transform what is read.")
OCCLUSION_NOTE = ("Occlusion deletes one earlier token and runs the prompt again; the tokens after it move one "
                  "position earlier, so a change can also come from the shifted positions.")


# ---------------------------------------------------------------- the forward pass


@dataclass
class TracedForward:
    """One forward pass through the explicit attention path; tensors stay here, numbers go to the Explanation."""

    ids: list[int]
    logits: torch.Tensor  # (T, V), after any softcap: what sampling sees
    raw_logits: torch.Tensor  # (T, V) before the softcap
    trace: list[dict]  # one dict per block, see GPT.forward
    final_residual: torch.Tensor  # (T, C): the residual stream after the last block, before the final norm


@torch.no_grad()
def trace_forward(model, ids: list[int]) -> TracedForward:
    idx = torch.tensor([ids], dtype=torch.long, device=_device(model))
    trace: list[dict] = []
    logits = model(idx, trace=trace)[0].float()
    last = trace[-1]
    final_residual = (last["residual_in"] + last["attn_out"] + last["mlp_out"])[0]  # the block's own sum order
    raw = model.head(model.final_norm(final_residual)).float()
    return TracedForward(ids, logits, raw, trace, final_residual)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_logits(model, ids: list[int]) -> torch.Tensor:
    """The logits after ids exactly as generation computes them: prefill on a fresh KV cache."""
    from ..generate import prefill

    idx = torch.tensor([ids], dtype=torch.long, device=_device(model))
    return prefill(model, idx, model.new_cache(1))[0].float()


# ---------------------------------------------------------------- building the explanation


def encode(tokenizer, prompt: str, context_length: int, source: str = "the prompt",
           setting: str | None = None) -> list[int]:
    """The prompt's token ids; `setting` names the option the text came from (None: the prompt itself)."""
    if not prompt:
        raise PotionError(f"{source} is empty; give some text to explain, e.g. potion explain \"ROMEO:\"",
                          setting=setting)
    try:
        ids = tokenizer.encode(prompt, source=source)
    except PotionError as e:  # the tokenizer does not know which setting the text came from
        raise PotionError(str(e), setting=e.setting or setting) from None
    if len(ids) > context_length:
        raise PotionError(f"{source} has {len(ids)} tokens; this model's context is {context_length}: shorten it",
                          setting=setting)
    return ids


def check_probe(tokenizer, prompt: str, context_length: int) -> None:
    """Fail before training starts if the probe text cannot be explained by this model."""
    encode(tokenizer, prompt, context_length, source="the probe text", setting="probe")


def _check_choices(config, T: int, token: int, layer: int | None, head: int | None, top_k: int) -> None:
    if not -T <= token < T:
        raise PotionError(f"token {token} is out of range: the prompt has {T} tokens (0 to {T - 1}, or -1 for the "
                          "last)", setting="token")
    for name, value, count, plural in (("layer", layer, config.n_layer, "layers"),
                                       ("head", head, config.n_head, "heads per layer")):
        if value is not None and not 0 <= value < count:
            raise PotionError(f"{name} {value} is out of range: this model has {count} {plural} (0 to {count - 1})",
                              setting=name)
    if top_k < 1:
        raise PotionError(f"top_k must be at least 1, got {top_k}", setting="top_k")


def explain(model, prompt: str, tokenizer=None, token: int = -1, layer: int | None = None, head: int | None = None,
            top_k: int = 5, expect: str | None = None, step: int | None = None) -> Explanation:
    """Explain the prediction after token `token` of `prompt` (negative counts from the end, like Python).

    model is a GPT (then pass its tokenizer), the (model, tokenizer) pair potion.load returns, or a run directory.
    """
    model, tokenizer = _model_and_tokenizer(model, tokenizer)
    config = model.config
    ids = encode(tokenizer, prompt, config.context_length)
    _check_choices(config, len(ids), token, layer, head, top_k)
    focus = token % len(ids)

    was_training = model.training
    model.eval()  # no dropout: the explanation must be the model's deterministic computation
    try:
        return _explain(model, tokenizer, prompt, ids, focus, layer, head, top_k, expect, step)
    finally:
        model.train(was_training)


def _model_and_tokenizer(model, tokenizer):
    if isinstance(model, (str, Path)):
        from .. import load  # the public potion.load, whichever module resolves runs

        model = load(model)
    if not isinstance(model, torch.nn.Module):  # what potion.load returns unpacks as (model, tokenizer)
        try:
            model, tokenizer = model
        except (TypeError, ValueError):
            raise PotionError(f"explain needs a GPT, what potion.load returns, or a run directory; got "
                              f"{type(model).__name__}") from None
    if tokenizer is None:
        raise PotionError("explain needs the model's tokenizer: potion.explain(model, prompt, tokenizer), "
                          "or pass what potion.load returns, or a run directory")
    return model, tokenizer


@torch.no_grad()
def _explain(model, tokenizer, prompt, ids, focus, layer, head, top_k, expect, step) -> Explanation:
    config = model.config
    tokens = tuple(Token(i, t, tokenizer.token_text(t), visible(tokenizer.token_text(t))) for i, t in enumerate(ids))
    forward = trace_forward(model, ids)
    logits = forward.logits[focus]

    def candidate(token_id: int, row: torch.Tensor) -> Candidate:
        probs = row.softmax(-1)
        text = tokenizer.token_text(token_id)
        rank = int((row > row[token_id]).sum()) + 1
        return Candidate(token_id, text, visible(text), float(probs[token_id]), float(row[token_id]), rank)

    def top_candidates(row: torch.Tensor, k: int) -> tuple[Candidate, ...]:
        return tuple(candidate(int(i), row) for i in row.topk(min(k, row.numel())).indices)

    prediction = top_candidates(logits, top_k)
    expected = None
    if expect is not None:
        expected_ids = encode(tokenizer, expect, 10**9, source="the expect text", setting="expect")
        c = candidate(expected_ids[0], logits)
        expected = Expected(expect, c, len(expected_ids), c.rank <= top_k)
    target = expected.candidate if expected else prediction[0]
    target_reason = "the expected token (--expect)" if expected else "the top prediction"

    heads = tuple(_head_attention(config, forward.trace[i], i, h, focus, tokens, top_k)
                  for i in range(config.n_layer) for h in range(config.n_head))
    if layer is None:
        layer = config.n_layer - 1
    if head is None:  # the head that is most sure where to look: usually the easiest one to read first
        head = max(range(config.n_head), key=lambda h: heads[layer * config.n_head + h].keys[0].weight)
    averages = tuple(_head_average(forward.trace[i], i, focus, tokens, top_k) for i in range(config.n_layer))
    lens = _logit_lens(model, forward, focus, target.id, top_candidates, top_k)
    matrices, matrices_note = _matrices(model, forward, tokens, focus, top_candidates)
    logit_parts, parts_error = attribution(model, forward, focus, target)
    checks = Checks(
        row_sum=max(float((r["weights"].sum(-1) - 1).abs().max()) for r in forward.trace),
        heads_to_attention_output=heads_to_attention_output_error(model, forward.trace),
        parts_to_residual=parts_error,
        logits_vs_generate=float((generate_logits(model, ids[: focus + 1]) - logits).abs().max()),
        lens_last_vs_logits=float((_lens_logits(model, forward, config.n_layer - 1)[focus] - logits).abs().max()),
    )
    return Explanation(
        format=FORMAT, prompt=prompt,
        model=ModelSummary(config.n_layer, config.n_head, config.head_dim, config.n_embd, config.context_length,
                           config.positions, config.norm, tokenizer.kind, config.vocab_size),
        tokens=tokens, focus=focus, layer=layer, head=head, top_k=top_k,
        prediction=prediction, expected=expected, target=target, target_reason=target_reason,
        masked=tuple(range(focus + 1, len(ids))), heads=heads, head_averages=averages,
        lens=lens, target_enters_top_k=_enters_top_k(lens, top_k),
        occlusion=_occlusion(model, ids, focus, target.id, tokens),
        attribution=logit_parts, matrices=matrices, matrices_note=matrices_note, checks=checks,
        notes=(ATTENTION_CAVEAT, OCCLUSION_NOTE, LOGIT_ATTRIBUTION_NOTE), step=step,
    )


def _head_attention(config, record: dict, layer: int, head: int, focus: int, tokens, top_k: int) -> HeadAttention:
    weights = record["weights"][0, head, focus, : focus + 1].double()  # visible keys only: 0..focus
    scores = record["scores"][0, head, focus, : focus + 1].double()
    scaled = record["scaled_scores"][0, head, focus, : focus + 1].double()
    value_norms = record["value"][0, head, : focus + 1].double().norm(dim=-1)
    order = weights.argsort(descending=True, stable=True)
    keys = tuple(KeyWeight(int(j), tokens[j].label, float(scores[j]), float(scaled[j]), float(weights[j]),
                           float(value_norms[j]), float(weights[j] * value_norms[j])) for j in order[:top_k])
    listed = sum(k.weight for k in keys)
    row_sum = float(weights.sum())
    worked = _worked_example(config, record, head, focus, int(order[0]), scaled)
    return HeadAttention(layer, head, _rounded(weights), keys, max(row_sum - listed, 0.0), row_sum, worked)


def _worked_example(config, record, head: int, focus: int, key: int, scaled_row: torch.Tensor) -> WorkedExample:
    q = record["query"][0, head, focus].double()
    k = record["key"][0, head, key].double()
    n = min(WORKED_ENTRIES, q.numel())
    products = q * k
    dot = float(products.sum())
    scale = math.sqrt(config.head_dim)
    shift = float(scaled_row.max()) if float(scaled_row.max()) > EXP_LIMIT else 0.0
    exps = (scaled_row - shift).exp()
    steps = [name for name, used in (("their per-head RMS norm", config.qk_norm),
                                     ("the rotary position rotation", config.positions == "rope")) if used]
    note = f"q and k after {' and '.join(steps)}" if steps else ""
    return WorkedExample(
        query_index=focus, key_index=key, head_dim=q.numel(),
        query_entries=tuple(q[:n].tolist()), key_entries=tuple(k[:n].tolist()), products=tuple(products[:n].tolist()),
        rest_of_dot_product=float(products[n:].sum()), dot_product=dot,
        score=float(record["scores"][0, head, focus, key]), scale=scale, scaled_score=dot / scale, shift=shift,
        exp_score=float(exps[key]), exp_sum=float(exps.sum()), weight=float(exps[key] / exps.sum()), note=note,
    )


def _head_average(record: dict, layer: int, focus: int, tokens, top_k: int) -> HeadAverage:
    weights = record["weights"][0, :, focus, : focus + 1].double()  # (H, focus + 1)
    value_norms = record["value"][0, :, : focus + 1].double().norm(dim=-1)  # (H, focus + 1)
    mean_weight, mean_norm = weights.mean(0), value_norms.mean(0)
    mean_weighted = (weights * value_norms).mean(0)
    order = mean_weight.argsort(descending=True, stable=True)[:top_k]
    keys = tuple(AverageKey(int(j), tokens[j].label, float(mean_weight[j]), float(mean_norm[j]),
                            float(mean_weighted[j])) for j in order)
    label = f"average of the {weights.size(0)} heads (a summary, not a step the model computes)"
    return HeadAverage(layer, label, _rounded(mean_weight), keys, max(1.0 - sum(k.weight for k in keys), 0.0))


def _rounded(row: torch.Tensor, digits: int = 5) -> tuple[float, ...]:
    """Whole rows are for pictures; five decimals keep the JSON small and are finer than any colour step."""
    return tuple(round(x, digits) for x in row.tolist())


def _residual_after(forward: TracedForward, layer: int) -> torch.Tensor:
    """(T, C): the residual stream after block `layer`; layer -1 = after the embeddings."""
    if layer == -1:
        return forward.trace[0]["residual_in"][0]
    r = forward.trace[layer]
    return (r["residual_in"] + r["attn_out"] + r["mlp_out"])[0]


def _lens_logits(model, forward: TracedForward, layer: int) -> torch.Tensor:
    return model.readout(_residual_after(forward, layer)).float()


def _logit_lens(model, forward, focus: int, target_id: int, top_candidates, top_k: int) -> tuple[LensLayer, ...]:
    rows = []
    for layer in range(-1, model.config.n_layer):
        row = _lens_logits(model, forward, layer)[focus]
        probs = row.softmax(-1)
        name = "embeddings" if layer == -1 else f"layer {layer}"
        rank = int((row > row[target_id]).sum()) + 1
        rows.append(LensLayer(layer, name, top_candidates(row, top_k), rank, float(probs[target_id])))
    return tuple(rows)


def _enters_top_k(lens: tuple[LensLayer, ...], top_k: int) -> str:
    """The first lens row from which the target stays in the top-k to the end ("" if it never gets there)."""
    entered = ""
    for row in lens:
        if row.target_rank <= top_k:
            entered = entered or row.name
        else:
            entered = ""
    return entered


def _occlusion(model, ids: list[int], focus: int, target_id: int, tokens) -> tuple[OcclusionEffect, ...]:
    """For each token before the focus: the target's probability with that one token deleted."""
    if focus == 0:
        return ()
    device = _device(model)
    base = model(torch.tensor([ids[: focus + 1]], device=device))[0, -1].float().softmax(-1)[target_id]
    without = [ids[:j] + ids[j + 1 : focus + 1] for j in range(focus)]
    probs = []
    for start in range(0, len(without), OCCLUSION_BATCH):
        batch = torch.tensor(without[start : start + OCCLUSION_BATCH], device=device)
        probs += model(batch)[:, -1].float().softmax(-1)[:, target_id].tolist()
    return tuple(OcclusionEffect(j, tokens[j].label, p, p - float(base)) for j, p in enumerate(probs))


def _matrices(model, forward: TracedForward, tokens, focus: int,
              top_candidates) -> tuple[AttentionMatrices | None, str]:
    config = model.config
    T = len(tokens)
    per_token_pair = 2 * config.n_layer * config.n_head  # a weight and a score per layer and head

    def fits(t: int) -> bool:
        return per_token_pair * t * (t + 1) // 2 <= MATRIX_BUDGET

    if not fits(T):
        longest = max((t for t in range(1, T) if fits(t)), default=0)
        return None, (f"every token's attention is included for prompts of up to {longest} tokens with this model; "
                      f"this prompt has {T}, so only token {focus} is shown (choose another with --token)")

    def lower_triangles(name: str, digits: int):  # query i sees keys 0..i
        return tuple(tuple(tuple(tuple(round(x, digits) for x in record[name][0, h, i, : i + 1].tolist())
                                 for i in range(T))
                           for h in range(config.n_head))
                     for record in forward.trace)

    value_norms = tuple(tuple(tuple(round(x, 4) for x in record["value"][0, h].norm(dim=-1).tolist())
                              for h in range(config.n_head))
                        for record in forward.trace)
    guesses = tuple(top_candidates(forward.logits[i], NEXT_BY_POSITION) for i in range(T))
    return AttentionMatrices(lower_triangles("weights", 5), lower_triangles("scores", 4), value_norms, guesses), ""


def save_probe(model, tokenizer, prompt: str, run_dir: Path, step: int) -> Path:
    """The explain data for the probe prompt at this training step (run_dir/probes/step-N.json)."""
    path = probe_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_json(explain(model, prompt, tokenizer, step=step), path)
    return path
