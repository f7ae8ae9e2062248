"""A pretrained model made ready to learn conversations: a model with no chat template (GPT-2, a potion run trained on
text) gets ChatML's <|im_start|> and <|im_end|> as new tokens, and its embedding (and an untied output head) a row
for each. A model with a template of its own (SmolLM2, Qwen, Llama 3 instruct) is left as it is.
"""

from __future__ import annotations

import torch

from potion.data.conversations import chat_ready
from potion.data.tokenizer import Tokenizer

# the weights with a row per token; a tied head is the token embedding itself, and model_state leaves it out
VOCABULARY_ROWS = ("token_embedding.weight", "head.weight", "value_embedding.weight")


def chat_vocabulary(tokenizer: Tokenizer, weights: dict[str, torch.Tensor]) -> tuple[Tokenizer, dict]:
    """The tokenizer with ChatML's tokens where it needs them, and the weights grown to its vocabulary."""
    ready = chat_ready(tokenizer)
    return ready, grown(weights, ready.vocab_size)


def grown(weights: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """weights with vocab_size rows in each matrix that has a row per token. A new row starts as the mean of the
    existing rows, a common choice (Hewitt, "Initializing new word embeddings", 2021): a new token then looks like
    an average token, and its logit starts near the others' instead of far off as a random row's can, so the first
    steps do not spend themselves undoing it."""
    out = dict(weights)
    for name in VOCABULARY_ROWS:
        rows = out.get(name)
        if rows is None or rows.shape[0] >= vocab_size:
            continue
        mean = rows.float().mean(dim=0, keepdim=True).to(rows.dtype)
        out[name] = torch.cat([rows, mean.expand(vocab_size - rows.shape[0], -1)])
    return out
