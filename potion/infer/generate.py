"""Generation: prefill the prompt, then decode one token at a time from the KV cache.

The sampling rules themselves are the small pure functions of potion.infer.sampling.
"""

from __future__ import annotations

import copy
import functools
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Generator, Iterator

import torch

from potion.config import SamplingConfig  # lives with the other configs; importable from here too
from potion.hardware import DTYPES
from potion.infer.sampling import sample_next, sample_with_probs, token_probs
from potion.infer.speculate import DRAFT_TOKENS, best_draft_count, check, draft, int4_available, make_drafter
from potion.model.attention import fuse_projections
from potion.model.cache import KVCache

# Under about this many bytes of fp32 weights a CPU decode step is bound by per-operation overhead rather than by
# reading the weights, so bf16 weights gain nothing (docs/benchmarks.md, "Decoding internals").
BF16_DECODE_MIN_BYTES = 8 * 2**20
DECODING_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {kind: (versions, copy)}


def prefill(model, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the whole prompt through the model, filling the cache; returns the last position's logits (B, V)."""
    return model(idx, cache=cache, last_only=True)[:, -1]


def decode_one_token(model, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """token (B,) -> logits (B, V) for the position after it."""
    return model(token[:, None], cache=cache, last_only=True)[:, -1]


def refill(model, idx: torch.Tensor, cache: KVCache, dtype: torch.dtype) -> tuple[torch.Tensor, KVCache]:
    """Prefill idx into cache from position 0; returns the last logits (B, V) and the cache in the decoder's
    precision (the same cache when the precisions match)."""
    cache.reset()
    logits = prefill(model, idx, cache)
    return logits, cache.to(dtype)


def decoding_dtype(model, decode_dtype: str = "auto") -> torch.dtype:
    """The weight precision for one-token decode steps.

    At batch 1 a decode step reads every weight to do one multiply-add with it, so its speed is the memory's, and
    bf16 weights (half the bytes) decode faster even on CPUs that have no bf16 arithmetic. auto picks bf16 on CUDA
    and on a CPU once the weights are big enough for their reading to dominate; fp32 keeps decoding bit-exact
    with the full forward pass.
    """
    if decode_dtype in DTYPES:
        return DTYPES[decode_dtype]
    first = next(model.parameters())
    if first.device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else first.dtype
    return torch.bfloat16 if weight_reading_dominates(model) else first.dtype


def weight_reading_dominates(model) -> bool:
    """Whether a one-token step on this CPU takes as long as it does because of reading the weights."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return next(model.parameters()).device.type == "cpu" and weight_bytes >= BF16_DECODE_MIN_BYTES


def drafts_per_check(model, batch_size: int, draft_tokens: int | None) -> int:
    """How many tokens a 4-bit copy drafts before the decoder checks them (0: no speculative decoding).

    None picks DRAFT_TOKENS where a step is bound by reading the weights on a CPU, for one sequence at a time
    (rows of a batch would keep different numbers of drafts); the 4-bit kernels are CPU kernels.
    """
    possible = batch_size == 1 and next(model.parameters()).device.type == "cpu" and int4_available()
    if draft_tokens is None:
        return DRAFT_TOKENS if possible and weight_reading_dominates(model) else 0
    return draft_tokens if possible else 0


def decoding_model(model, dtype: torch.dtype, checks: bool = False):
    """model itself, or a copy in dtype for the decode steps (prefill stays in the model's own precision, where
    arithmetic rather than memory dominates and a CPU without bf16 hardware is several times slower in bf16).

    checks: the decoder will also check drafted tokens, products of a few rows, where a copy with packed weights
    pays in fp32 too (docs/benchmarks.md, "Decoding internals").
    """
    on_cpu = next(model.parameters()).device.type == "cpu"
    packs_fp32 = checks and on_cpu and packing_available(torch.float32)
    if next(model.parameters()).dtype == dtype and not (dtype == torch.float32 and packs_fp32):
        return model

    def make(model):
        decoder = copy.deepcopy(model).to(dtype)
        fuse_projections(decoder)
        if on_cpu:
            use_fast_products(decoder)
        return decoder

    return kept_copy(model, dtype, make)


def drafting_model(model, dtype: torch.dtype):
    """The 4-bit drafting copy of model, its other numbers in dtype: the precision of the cache it shares with the
    decoder (see potion.infer.speculate)."""
    return kept_copy(model, ("4-bit drafter", dtype), functools.partial(make_drafter, dtype=dtype))


def kept_copy(model, kind, make):
    """make(model), made once per kind and set of weights and kept while the model lives (making a decode copy
    of GPT-2 small takes about a second); a change to the weights, such as an optimizer step, makes a fresh one."""
    versions = tuple(p._version for p in model.parameters())  # in-place updates bump a tensor's version
    copies = DECODING_COPIES.setdefault(model, {})
    kept = copies.get(kind)
    if kept is None or kept[0] != versions:
        kept = copies[kind] = (versions, make(model))
    return kept[1]


class VectorLinear(torch.nn.Linear):
    """A Linear whose one-row products run as torch.mv: at batch 1 on a CPU, PyTorch's matrix-vector kernel gets
    through bf16 weights faster than its matrix-matrix one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() != 1:
            return super().forward(x)
        y = torch.mv(self.weight, x.reshape(-1))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)


class PackedLinear(torch.nn.Module):
    """A Linear whose weight oneDNN has laid out once, ahead of time, for products with a few rows: the decode
    steps and speculative checks: a product of 8 rows then takes about as long as one of 1 row."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 8)  # up to 8 rows
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [None], "")


@functools.cache
def packing_available(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack weights of dtype on this CPU (bf16 needs AVX-512 BF16 or AMX to be worth it)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def use_fast_products(model: torch.nn.Module) -> None:
    """Swap every Linear of a CPU decoding copy for a PackedLinear where oneDNN packs its precision, else for a
    VectorLinear holding the same parameters (a tied head stays tied)."""
    packing = packing_available(next(model.parameters()).dtype)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            if packing:
                setattr(module, name, PackedLinear(child))
                continue
            vector = VectorLinear(child.in_features, child.out_features, bias=False, device="meta")
            vector.weight, vector.bias = child.weight, child.bias
            setattr(module, name, vector)


@torch.inference_mode()
def generate_tokens(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eot_id: int | None = None,
    decode_dtype: str = "auto",
    draft_tokens: int | None = None,
    vocab_size: int = 0,
    on_logits=None,
) -> Iterator[torch.Tensor]:
    """Yield next-token ids (B,) one step at a time. Stops after eot_id when every row has produced it.

    The prompt is prefilled in the model's precision; the one-token steps run in decode_dtype (see decoding_dtype).
    When the context fills up, the cache is refilled from the last half of the context, so generation can go on
    past context_length tokens (each new token then sees at most context_length - 1 earlier ones). With
    draft_tokens > 0 (or None where it pays, see drafts_per_check) the steps are speculative (potion.infer.speculate).
    vocab_size > 0: only ids below it are drawn (the tokenizer's own, where the embedding has padding rows).
    on_logits(logits (B, V), token (B,)) sees each token with the logits it was drawn from (potion.infer.logprobs);
    the steps are then one token at a time, since a speculative check keeps no logits for the tokens it accepts.
    """
    rules = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "vocab_size": vocab_size}
    decode_as = decoding_dtype(model, decode_dtype)
    drafts = 0 if on_logits else drafts_per_check(model, idx.size(0), draft_tokens)
    if drafts > 0:
        adapt = draft_tokens is None
        yield from speculative_tokens(model, idx, max_new_tokens, rules, generator, eot_id, decode_as, drafts, adapt)
        return
    context = window_length(model, idx, max_new_tokens)
    history = idx[:, -context:]
    decoder = decoding_model(model, decode_as)
    prefill_cache = model.new_cache(idx.size(0), context)  # allocated once; refilled when the context is full
    logits, cache = refill(model, history, prefill_cache, decode_as)
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for made in range(1, max_new_tokens + 1):
        token = sample_next(logits, **rules, generator=generator)
        if on_logits is not None:
            on_logits(logits, token)
        yield token
        if eot_id is not None:
            finished |= token == eot_id
        if made == max_new_tokens or bool(finished.all()):
            return  # no step past the last token: its logits would go unread
        history = torch.cat((history, token[:, None]), dim=1)[:, -context:]  # all a refill can use
        if cache.length >= context:
            logits, cache = refill(model, history[:, -(context // 2) :], prefill_cache, decode_as)
        else:
            logits = decode_one_token(decoder, token, cache)


def window_length(model, idx: torch.Tensor, max_new_tokens: int) -> int:
    """Positions the cache needs: the prompt and every new token, up to the model's context (past it, generation
    refills from the last half of the context)."""
    return min(model.config.context_length, idx.size(1) + max(max_new_tokens, 1))


def speculative_tokens(
    model, idx, max_new_tokens: int, rules: dict, generator, eot_id, decode_as, drafts: int, adapt: bool
):
    """generate_tokens for one sequence, checking `drafts` guesses of a 4-bit copy per decoder pass. With adapt,
    the number of guesses follows how many the decoder keeps (see speculate.best_draft_count).

    The drafter and the decoder share one cache: the drafter reads the decoder's keys and values of every token
    so far and writes its own past them, which the check then overwrites. `window` holds the tokens in the cache.
    """
    context = window_length(model, idx, max_new_tokens)
    decoder, drafter = decoding_model(model, decode_as, checks=True), drafting_model(model, decode_as)
    window = idx[:, -context:]
    prefill_cache = model.new_cache(1, context)
    logits, cache = refill(model, window, prefill_cache, decode_as)
    probs_of = functools.partial(token_probs, **rules)

    def pick(logits):  # (1, V) -> the drawn token and its probabilities
        token, probs = sample_with_probs(logits, **rules, generator=generator)
        return int(token), probs

    made, replacement, tested, kept_total = 0, None, 0, 0
    while made < max_new_tokens:
        token = replacement if replacement is not None else pick(logits)[0]
        guesses = min(drafts, context - cache.length - 1, max_new_tokens - made - 1)
        new, replacement = [token], None
        if guesses > 0:
            before = cache.length
            drafted, drafted_probs = draft(drafter, cache, token, guesses, pick)
            verified = decoder(idx.new_tensor([[token, *drafted]]), cache=cache)[0]  # (guesses + 1, V)
            kept, replacement = check(verified, drafted, drafted_probs, probs_of, generator, rules["vocab_size"])
            cache.length = before + 1 + kept  # the rejected positions are overwritten later
            logits = verified[kept : kept + 1]
            new += drafted[:kept]
            tested, kept_total = tested + kept + (kept < guesses), kept_total + kept  # after a miss: untested
            drafts = best_draft_count(kept_total, tested) if adapt else drafts
        for t in new:
            yield idx.new_tensor([t])
            made += 1
            if t == eot_id or made == max_new_tokens:
                return
        window = torch.cat((window, idx.new_tensor([new])), dim=1)
        if guesses > 0:
            continue
        if cache.length >= context:
            window = window[:, -(context // 2) :]
            logits, cache = refill(model, window, prefill_cache, decode_as)
        else:
            logits = decode_one_token(decoder, window[0, -1:], cache)


@dataclass
class Sample:
    text: str
    tokens: int
    finish_reason: str  # eot | stop | length


def encode_prompt(tokenizer, prompt: str, context_length: int) -> list[int]:
    """An empty prompt starts from end-of-text; a prompt longer than the context keeps its last tokens."""
    ids = tokenizer.encode(prompt, source="the prompt") if prompt else []
    if not ids:
        return [tokenizer.eot_id]
    if len(ids) > context_length:
        warnings.warn(
            f"the prompt has {len(ids)} tokens; this model's context is {context_length}, so only the last "
            f"{context_length} are used",
            stacklevel=2,
        )
        ids = ids[-context_length:]
    return ids


def generate_text(model, tokenizer, prompt: str, sampling: SamplingConfig, on_text=None) -> tuple[list[Sample], float]:
    """Generate num_samples continuations of prompt. on_text(sample_index, new_text) streams as it goes.

    Returns the samples and the decode speed in tokens per second.
    """
    device = next(model.parameters()).device
    ids = encode_prompt(tokenizer, prompt, model.config.context_length)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    samples, started = [], time.perf_counter()
    for i in range(sampling.num_samples):
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        stream = functools.partial(on_text, i) if on_text else None
        samples.append(continue_prompt(model, tokenizer, idx, sampling, generator, stream))
    elapsed = time.perf_counter() - started
    total_tokens = sum(s.tokens for s in samples)
    return samples, total_tokens / elapsed if elapsed > 0 else 0.0


def continue_prompt(model, tokenizer, idx: torch.Tensor, sampling: SamplingConfig, generator, stream=None) -> Sample:
    """One continuation of idx (1, T) up to end-of-text, a stop string or max_new_tokens. stream(new_text) gets
    the text as it settles (never part of a stop string or half a character)."""
    steps = continuation(model, tokenizer, idx, sampling, generator)
    while True:
        try:
            piece = next(steps)
        except StopIteration as finished:
            return finished.value
        if stream and piece:
            stream(piece)


def continuation(
    model, tokenizer, idx: torch.Tensor, sampling: SamplingConfig, generator, on_logits=None
) -> Generator[str, None, Sample]:
    """continue_prompt one token at a time, for callers that interleave several continuations (potion serve):
    each step yields the text that settled with its token ("" while a stop string may be starting or a character
    is half decoded), and the generator returns the Sample. on_logits: see generate_tokens."""
    tokens = generate_tokens(
        model,
        idx,
        sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_k=sampling.top_k or 0,
        top_p=sampling.top_p,
        generator=generator,
        eot_id=tokenizer.eot_id,
        decode_dtype=sampling.decode_dtype,
        draft_tokens=sampling.draft_tokens,
        vocab_size=tokenizer.vocab_size,  # a padded embedding's extra rows are never drawn
        on_logits=on_logits,
    )
    new_ids: list[int] = []
    text, shown, reason = "", 0, "length"
    for token in tokens:
        t = int(token[0])
        if t == tokenizer.eot_id:
            reason = "eot"
            break
        new_ids.append(t)
        text = tokenizer.decode(new_ids)
        hit = _first_stop(text, sampling.stop)
        if hit is not None:
            text, reason = text[:hit], "stop"
            break
        settled = max(_settled_length(text, sampling.stop), shown)
        yield text[shown:settled]
        shown = settled
    tokens.close()  # the decoder's cache is freed now, not when the caller drops this generator
    if len(text) > shown:
        yield text[shown:]
    return Sample(text, len(new_ids), reason)


def _settled_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of text can be shown now: not a half-decoded character, not the possible start of a stop string."""
    end = len(text.rstrip("\ufffd"))
    for s in stops:
        for n in range(min(len(s) - 1, end), 0, -1):
            if text[end - n : end] == s[:n]:
                end -= n
                break
    return end


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
