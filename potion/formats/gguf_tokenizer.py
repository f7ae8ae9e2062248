"""A GGUF file's tokenizer as a `tokenizers` object: the byte-level BPE that llama.cpp calls "gpt2".

A GGUF has no tokenizer.json; its metadata holds the vocabulary, the merges, each token's type and the name of
the pre-tokenizer (tokenizer.ggml.pre), the rule that cuts text into words before the merges run. Each name
stands for the regex split that llama.cpp (llama-vocab.cpp) and transformers' GGUF tokenizer converter use, so
the same text gives the same ids in potion, llama.cpp and transformers.
"""

from __future__ import annotations

from potion.config.configs import MAX_BPE_VOCAB
from potion.data.tokenizer import BPETokenizer
from potion.errors import PotionError

TOKENIZER_MODELS = ("gpt2",)
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (gguf.TokenType)

# GPT-2's split is the one tokenizers' ByteLevel applies itself (use_regex=True)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> how it splits; names llama.cpp treats as one are listed together
PRE_TOKENIZERS = {
    "gpt2": "gpt2",
    "gpt-2": "gpt2",  # llama.cpp's own spelling, which potion export writes
    "smollm": "digits+gpt2",  # every digit its own word, then GPT-2's split (SmolLM's own tokenizer.json)
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "qwen2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
}


def check_kind(model: str, pre: str, where: str) -> None:
    """A tokenizer potion can build: refused before its arrays are read."""
    if model not in TOKENIZER_MODELS:
        raise PotionError(
            f"{where} has a {model!r} tokenizer; potion reads GGUF byte-level BPE tokenizers "
            f"(tokenizer.ggml.model = {', '.join(TOKENIZER_MODELS)}) so far"
        )
    if pre not in PRE_TOKENIZERS:
        raise PotionError(
            f"{where}: the pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; potion knows "
            f"{', '.join(PRE_TOKENIZERS)}"
        )


def gguf_tokenizer(
    tokens: list[str], merges: list[str], token_types: list[int], eos_id: int, pre: str, where: str
) -> BPETokenizer:
    """The byte-level BPE the metadata describes; eos_id's token ends a generation."""
    if not 1 <= len(tokens) <= MAX_BPE_VOCAB:
        raise PotionError(f"{where} lists {len(tokens):,} tokens; potion reads 1 to {MAX_BPE_VOCAB:,}")
    if not 0 <= eos_id < len(tokens):
        raise PotionError(f"{where}: the end-of-sequence token id {eos_id} is not one of its {len(tokens)} tokens")
    tk = bpe(tokens, merges, ignore_merges=PRE_TOKENIZERS[pre] == "llama3", where=where)
    tk.pre_tokenizer = pre_tokenizer(PRE_TOKENIZERS[pre])
    add_special_tokens(tk, tokens, token_types, where)
    return BPETokenizer(tk, tokens[eos_id])


def bpe(tokens: list[str], merges: list[str], ignore_merges: bool, where: str):
    """The BPE model over the file's vocabulary, with the ByteLevel decoder that turns its byte alphabet back
    into UTF-8. ignore_merges: a word that is itself a token stays whole (llama.cpp does this for Llama 3, as
    Llama 3's own tokenizer.json says)."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {}
    for i, token in enumerate(tokens):
        if vocab.setdefault(token, i) != i:
            raise PotionError(f"{where}: the token {token!r} is in the vocabulary twice (ids {vocab[token]} and {i})")
    pairs = []
    for merge in merges:
        left, space, right = merge.partition(" ")
        if not space or left not in vocab or right not in vocab:
            raise PotionError(f"{where}: the merge {merge!r} does not join two tokens of the vocabulary")
        pairs.append((left, right))
    try:
        tk = Tokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    except Exception as e:  # the library's own error type
        raise PotionError(f"{where}: its vocabulary and merges do not make a tokenizer ({e})") from None
    tk.decoder = decoders.ByteLevel()
    return tk


def pre_tokenizer(kind: str):
    """The split into words, then each word's bytes spelled in the byte-level alphabet."""
    from tokenizers import Regex, pre_tokenizers

    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "digits+gpt2":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    split = LLAMA3_SPLIT if kind == "llama3" else QWEN2_SPLIT
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def add_special_tokens(tk, tokens: list[str], token_types: list[int], where: str) -> None:
    """Control tokens (<|im_start|>) and user-defined ones (<think>) are matched whole in the text, before the
    split, as llama.cpp matches them; control tokens are special, the others plain added tokens."""
    from tokenizers import AddedToken

    if len(token_types) != len(tokens):
        raise PotionError(f"{where} gives {len(token_types)} token types for {len(tokens)} tokens")
    control = [tokens[i] for i, kind in enumerate(token_types) if kind == CONTROL]
    user = [tokens[i] for i, kind in enumerate(token_types) if kind == USER_DEFINED]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
