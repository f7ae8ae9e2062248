"""Sampling: small pure functions from a logits vector to the next token.

temperature, top-k and top-p shape the distribution, then a draw (or, at temperature 0, the most likely token).
Logits that are NaN or +inf mean damaged weights, and are one clear error rather than a garbled text.
"""

from __future__ import annotations

import torch

from potion.errors import PotionError


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / max(temperature, 1e-8)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits; the rest can never be drawn."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities add up to at least p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    drop_sorted = probs.cumsum(dim=-1) - probs >= p  # mass before this token already reaches p
    drop_sorted[..., 0] = False  # the most likely token always stays (a p below float32's range rounds to 0)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def token_probs(
    logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float, vocab_size: int = 0
) -> torch.Tensor | None:
    """logits (B, V) -> the probabilities the next token is drawn with (B, V); None for greedy (temperature 0).

    vocab_size > 0: only the first vocab_size tokens can be drawn (probabilities (B, vocab_size)): a model may pad
    its embedding with rows no token of its tokenizer has."""
    logits = in_vocabulary(logits, vocab_size).float()
    refuse_damage(logits.max(dim=-1).values)
    if temperature == 0:
        return None
    logits = apply_top_p(apply_top_k(apply_temperature(logits, temperature), top_k), top_p)
    probs = logits.softmax(dim=-1)
    if not bool(probs.sum(dim=-1).isfinite().all()):  # finite logits can still overflow once divided by the temperature
        raise not_finite()
    return probs


def refuse_damage(top: torch.Tensor) -> None:
    """top: each row's largest logit. max carries a NaN through and a +inf would be the largest, so one look at
    the maxima finds both kinds of damage (-inf is no damage: a token ruled out)."""
    if bool((top.isnan() | top.isposinf()).any()):
        raise not_finite()


def sample_next(logits: torch.Tensor, *, generator: torch.Generator | None = None, **rules) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). rules: temperature (0 is greedy), top_k (0 is off), top_p (1 is off),
    vocab_size (see token_probs)."""
    return sample_with_probs(logits, generator=generator, **rules)[0]


def sample_with_probs(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    vocab_size: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sample_next, also returning the probabilities the tokens were drawn with (None for greedy)."""
    if temperature == 0:
        return greedy_tokens(in_vocabulary(logits, vocab_size)), None
    probs = token_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=vocab_size)
    return draw(probs, generator), probs


def in_vocabulary(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The logits of the first vocab_size tokens (all of them for 0)."""
    return logits[..., :vocab_size] if 0 < vocab_size < logits.size(-1) else logits


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of probs (B, V), drawn with those probabilities (rows need not sum to 1).

    One uniform number per row, placed on the running sum: a token is drawn when the number falls in its stretch,
    so a token of probability 0 never is. The same distribution as torch.multinomial at a fraction of its time on
    a CPU for a large vocabulary.
    The sum is taken in float64 so that the smallest probabilities keep their own width.
    """
    cumulative = probs.cumsum(dim=-1, dtype=torch.float64)  # (B, V)
    total = cumulative[..., -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=torch.float64) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # below the total even when rounded up
    return torch.searchsorted(cumulative, u, right=True).squeeze(-1)  # the first token whose stretch ends past u


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> the most likely token of each row (B,), the first of equals.

    max with its indices gives the choice and what refuse_damage needs in one pass, faster than argmax on a CPU.
    """
    top, tokens = logits.float().max(dim=-1)
    refuse_damage(top)
    return tokens


def not_finite() -> PotionError:
    return PotionError(
        "the model's next-token scores are not finite numbers (NaN or inf): its weights are damaged or too large"
    )
