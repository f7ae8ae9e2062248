"""Log-probabilities: of each token generation draws, and of each token of a prompt given the tokens before it.

They are the model's own: log_softmax of its logits at temperature 1, before temperature, top-k and top-p shape
the draw, as OpenAI and vLLM report them. A drawn token's log-probability comes from the logits it was drawn from
(on a CPU a large model decodes with a bf16 copy of its weights, see generate.decoding_dtype, so they can differ
from a full-precision forward pass by about 0.01); a prompt's come from the model itself, in its own precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from potion.infer.sampling import in_vocabulary

MAX_TOP = 20  # alternatives listed per position, as OpenAI's and vLLM's limit
PROMPT_CHUNK = 512  # positions per forward pass when scoring a prompt: each holds a row of vocabulary-wide logits


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens at this position and theirs, most likely first


def log_probs(logits: torch.Tensor, vocab_size: int = 0) -> torch.Tensor:
    """logits (..., V) -> log-probabilities (..., V) over the tokenizer's own tokens (a padded embedding's extra
    rows are never drawn, so they take no probability)."""
    return in_vocabulary(logits, vocab_size).float().log_softmax(dim=-1)


def scored(log_probs: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """log_probs (T, V) and the token taken at each position (T,) -> each token's TokenLogprob, with the `top` most
    likely tokens of its position."""
    chosen = log_probs.gather(-1, tokens[:, None])[:, 0].tolist()
    if top > 0:
        values, ids = log_probs.topk(min(top, log_probs.size(-1)), dim=-1)
        alternatives = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        alternatives = [()] * len(chosen)
    return [TokenLogprob(t, lp, alt) for t, lp, alt in zip(tokens.tolist(), chosen, alternatives)]


class Recorder:
    """generate_tokens' on_logits: the TokenLogprob of every token drawn (of the first row of a batch)."""

    def __init__(self, top: int, vocab_size: int = 0):
        self.top, self.vocab_size = top, vocab_size
        self.new: list[TokenLogprob] = []

    def __call__(self, logits: torch.Tensor, token: torch.Tensor) -> None:
        self.new += scored(log_probs(logits[:1], self.vocab_size), token[:1], self.top)

    def take(self) -> tuple[TokenLogprob, ...]:
        """The tokens recorded since the last take."""
        taken, self.new = tuple(self.new), []
        return taken


@torch.inference_mode()
def prompt_logprobs(model, ids: list[int], top: int = 0, vocab_size: int = 0) -> list[TokenLogprob | None]:
    """Each token of ids (at most the model's context) scored given the tokens before it; None for the first,
    which has none. The prompt runs through the model in chunks of PROMPT_CHUNK positions on one KV cache, so a
    long prompt never holds more than a chunk's logits."""
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    cache = model.new_cache(1, len(ids))
    scores: list[TokenLogprob | None] = [None]
    for start in range(0, len(ids) - 1, PROMPT_CHUNK):
        end = min(start + PROMPT_CHUNK, len(ids) - 1)
        logits = model(idx[:, start:end], cache=cache)[0]  # (end - start, V): predictions of tokens start+1..end
        scores += scored(log_probs(logits, vocab_size), idx[0, start + 1 : end + 1], top)
    return scores
