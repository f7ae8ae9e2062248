"""Look inside one prediction: the data behind `potion explain`.

explain(model, tokenizer, prompt) runs the prompt once through the model's explicit attention path
(potion.model.record.recording) and gathers, for one focus token (default: the last):

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

import functools
from pathlib import Path

import torch

from potion.errors import PotionError
from potion.explain.attention import all_matrices, head_attention, head_average
from potion.explain.attribution import LOGIT_ATTRIBUTION_NOTE, attribution, heads_to_attention_output_error
from potion.explain.forward import TracedForward, generate_logits, model_device, trace_forward
from potion.explain.schema import (
    FORMAT,
    Candidate,
    Checks,
    Expected,
    Explanation,
    LensLayer,
    ModelSummary,
    OcclusionEffect,
    Token,
    probe_path,
    save_json,
    visible,
)
from potion.model.shapes import Shapes

OCCLUSION_BATCH = 32  # sequences per forward pass when dropping tokens one at a time

ATTENTION_CAVEAT = (
    "Attention weights show where each token read from, not by themselves why the model predicts "
    "what it does: values, MLPs and later layers transform what is read."
)
OCCLUSION_NOTE = (
    "Occlusion deletes one earlier token and runs the prompt again; the tokens after it move one "
    "position earlier, so a change can also come from the shifted positions."
)


# ---------------------------------------------------------------- building the explanation


def encode(
    tokenizer, prompt: str, context_length: int, source: str = "the prompt", setting: str | None = None
) -> list[int]:
    """The prompt's token ids; `setting` names the option the text came from (None: the prompt itself)."""
    if not prompt:
        raise PotionError(
            f'{source} is empty; give some text to explain, e.g. potion explain "ROMEO:"', setting=setting
        )
    try:
        ids = tokenizer.encode(prompt, source=source)
    except PotionError as e:  # the tokenizer does not know which setting the text came from
        raise PotionError(str(e), setting=e.setting or setting) from None
    if len(ids) > context_length:
        raise PotionError(
            f"{source} has {len(ids)} tokens; this model's context is {context_length}: shorten it", setting=setting
        )
    return ids


def check_probe(tokenizer, prompt: str, context_length: int) -> None:
    """Fail before training starts if the probe text cannot be explained by this model."""
    encode(tokenizer, prompt, context_length, source="the probe text", setting="probe")


def _check_choices(config, T: int, token: int, layer: int | None, head: int | None, top_k: int) -> None:
    if not -T <= token < T:
        raise PotionError(
            f"token {token} is out of range: the prompt has {T} tokens (0 to {T - 1}, or -1 for the last)",
            setting="token",
        )
    for name, value, count, plural in (
        ("layer", layer, config.n_layer, "layers"),
        ("head", head, config.n_head, "heads per layer"),
    ):
        if value is not None and not 0 <= value < count:
            raise PotionError(
                f"{name} {value} is out of range: this model has {count} {plural} (0 to {count - 1})", setting=name
            )
    if top_k < 1:
        raise PotionError(f"top_k must be at least 1, got {top_k}", setting="top_k")


def explain(
    model,
    prompt: str,
    tokenizer=None,
    token: int = -1,
    layer: int | None = None,
    head: int | None = None,
    top_k: int = 5,
    expect: str | None = None,
    step: int | None = None,
) -> Explanation:
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
        from potion.formats.run import load

        model = load(model)
    if not isinstance(model, torch.nn.Module):  # what potion.load returns unpacks as (model, tokenizer)
        try:
            model, tokenizer = model
        except (TypeError, ValueError):
            raise PotionError(
                f"explain needs a GPT, what potion.load returns, or a run directory; got {type(model).__name__}"
            ) from None
    if tokenizer is None:
        raise PotionError(
            "explain needs the model's tokenizer: potion.explain(model, prompt, tokenizer), "
            "or pass what potion.load returns, or a run directory"
        )
    return model, tokenizer


def _candidate(tokenizer, token_id: int, row: torch.Tensor) -> Candidate:
    """Token `token_id` as a candidate next token under the logits `row`: its probability, logit and rank."""
    probs = row.softmax(-1)
    text = tokenizer.token_text(token_id)
    rank = int((row > row[token_id]).sum()) + 1
    return Candidate(token_id, text, visible(text), float(probs[token_id]), float(row[token_id]), rank)


def _top_candidates(tokenizer, row: torch.Tensor, k: int) -> tuple[Candidate, ...]:
    return tuple(_candidate(tokenizer, int(i), row) for i in row.topk(min(k, row.numel())).indices)


def _prediction(tokenizer, logits: torch.Tensor, expect: str | None, top_k: int):
    """(the top-k, the expected continuation or None, the target token "what mattered" is about, why that one)."""
    prediction = _top_candidates(tokenizer, logits, top_k)
    if expect is None:
        return prediction, None, prediction[0], "the top prediction"
    expected_ids = encode(tokenizer, expect, 10**9, source="the expect text", setting="expect")
    c = _candidate(tokenizer, expected_ids[0], logits)
    return prediction, Expected(expect, c, len(expected_ids), c.rank <= top_k), c, "the expected token (--expect)"


def _checks(model, forward: TracedForward, ids: list[int], focus: int, parts_error: float) -> Checks:
    """How far the numbers shown are from the model's own computation (each should be about 0)."""
    logits = forward.logits[focus]
    lens_last = _lens_logits(model, forward, model.config.n_layer - 1)[focus]
    return Checks(
        row_sum=max(float((r["weights"].sum(-1) - 1).abs().max()) for r in forward.trace),
        heads_to_attention_output=heads_to_attention_output_error(model, forward.trace),
        parts_to_residual=parts_error,
        logits_vs_generate=float((generate_logits(model, ids[: focus + 1]) - logits).abs().max()),
        lens_last_vs_logits=float((lens_last - logits).abs().max()),
    )


def _model_summary(config, tokenizer) -> ModelSummary:
    c, shapes = config, Shapes.of(config)
    return ModelSummary(
        c.n_layer,
        c.n_head,
        shapes.head_dim,
        c.n_embd,
        c.context_length,
        c.positions,
        c.norm,
        tokenizer.kind,
        c.vocab_size,
        shapes.n_kv_head,
    )


@torch.no_grad()
def _explain(model, tokenizer, prompt, ids, focus, layer, head, top_k, expect, step) -> Explanation:
    config = model.config
    tokens = tuple(Token(i, t, tokenizer.token_text(t), visible(tokenizer.token_text(t))) for i, t in enumerate(ids))
    forward = trace_forward(model, ids)
    top_candidates = functools.partial(_top_candidates, tokenizer)
    prediction, expected, target, target_reason = _prediction(tokenizer, forward.logits[focus], expect, top_k)
    heads = tuple(
        head_attention(config, forward.trace[i], i, h, focus, tokens, top_k)
        for i in range(config.n_layer)
        for h in range(config.n_head)
    )
    if layer is None:
        layer = config.n_layer - 1
    if head is None:  # the head that is most sure where to look: usually the easiest one to read first
        head = max(range(config.n_head), key=lambda h: heads[layer * config.n_head + h].keys[0].weight)
    lens = _logit_lens(model, forward, focus, target.id, top_candidates, top_k)
    matrices, matrices_note = all_matrices(config, forward.trace, forward.logits, tokens, focus, top_candidates)
    logit_parts, parts_error = attribution(model, forward, focus, target)
    return Explanation(
        format=FORMAT,
        prompt=prompt,
        model=_model_summary(config, tokenizer),
        tokens=tokens,
        focus=focus,
        layer=layer,
        head=head,
        top_k=top_k,
        prediction=prediction,
        expected=expected,
        target=target,
        target_reason=target_reason,
        masked=tuple(range(focus + 1, len(ids))),
        heads=heads,
        head_averages=tuple(head_average(r, i, focus, tokens, top_k) for i, r in enumerate(forward.trace)),
        lens=lens,
        target_enters_top_k=_enters_top_k(lens, top_k),
        occlusion=_occlusion(model, ids, focus, target.id, tokens),
        attribution=logit_parts,
        matrices=matrices,
        matrices_note=matrices_note,
        checks=_checks(model, forward, ids, focus, parts_error),
        notes=(ATTENTION_CAVEAT, OCCLUSION_NOTE, LOGIT_ATTRIBUTION_NOTE),
        step=step,
    )


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
    device = model_device(model)
    base = model(torch.tensor([ids[: focus + 1]], device=device))[0, -1].float().softmax(-1)[target_id]
    without = [ids[:j] + ids[j + 1 : focus + 1] for j in range(focus)]
    probs = []
    for start in range(0, len(without), OCCLUSION_BATCH):
        batch = torch.tensor(without[start : start + OCCLUSION_BATCH], device=device)
        probs += model(batch)[:, -1].float().softmax(-1)[:, target_id].tolist()
    return tuple(OcclusionEffect(j, tokens[j].label, p, p - float(base)) for j, p in enumerate(probs))


def save_probe(model, tokenizer, prompt: str, run_dir: Path, step: int) -> Path:
    """The explain data for the probe prompt at this training step (run_dir/probes/step-N.json)."""
    path = probe_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_json(explain(model, prompt, tokenizer, step=step), path)
    return path
