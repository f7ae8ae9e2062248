"""Log-probabilities in OpenAI's two shapes: the completions API's (tokens, token_logprobs, top_logprobs as
{text: logprob} dicts, text_offset) and the chat API's (content: a list of {token, logprob, bytes, top_logprobs}).

A token's text is the tokenizer's decoding of that token alone; its bytes are the bytes it stands for, which for
a byte-level vocabulary may be part of a character (its text then shows U+FFFD, its bytes are exact).
"""

from __future__ import annotations

import codecs
import functools
import re

from potion.infer.logprobs import TokenLogprob

BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a SentencePiece vocabulary's fallback for one byte


@functools.cache
def byte_level_alphabet() -> dict[str, int]:
    from tokenizers import pre_tokenizers

    return {ch: b for b, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}


class Vocabulary:
    """Each token's text and bytes, looked up once per token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.texts: dict[int, str] = {}
        self.raw: dict[int, bytes] = {}

    def text(self, token: int) -> str:
        if token not in self.texts:
            self.texts[token] = self.tokenizer.token_text(token)
        return self.texts[token]

    def bytes(self, token: int) -> bytes:
        if token not in self.raw:
            self.raw[token] = self._bytes(token)
        return self.raw[token]

    def _bytes(self, token: int) -> bytes:
        text = self.text(token)
        tk = getattr(self.tokenizer, "tk", None)  # a `tokenizers` vocabulary; a character one has whole characters
        if "\ufffd" not in text or tk is None:
            return text.encode("utf-8")
        piece = tk.id_to_token(token) or ""
        alphabet = byte_level_alphabet()
        if piece and all(ch in alphabet for ch in piece):
            return bytes(alphabet[ch] for ch in piece)
        if m := BYTE_TOKEN.fullmatch(piece):
            return bytes([int(m.group(1), 16)])
        return text.encode("utf-8")


class TextOffsets:
    """Where each token starts in a text that is the tokens' bytes decoded one after another: the characters
    decoded before it (a character split across tokens counts from the token that completes it)."""

    def __init__(self, vocabulary: Vocabulary, start: int = 0):
        self.vocabulary, self.length = vocabulary, start
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def next(self, token: int) -> int:
        at = self.length
        self.length += len(self.decoder.decode(self.vocabulary.bytes(token)))
        return at


def legacy(vocabulary: Vocabulary, tokens: list[int], scores: list[TokenLogprob | None], offsets: TextOffsets) -> dict:
    """The completions API's logprobs of tokens; a score of None (a prompt's first token) is null."""
    texts = [vocabulary.text(t) for t in tokens]
    return {
        "tokens": texts,
        "token_logprobs": [s.logprob if s else None for s in scores],
        "top_logprobs": [{vocabulary.text(t): lp for t, lp in s.top} if s else None for s in scores],
        "text_offset": [offsets.next(t) for t in tokens],
    }


def joined(parts: list[dict]) -> dict | None:
    """Legacy logprobs of consecutive stretches of one text as one."""
    if not parts:
        return None
    return {key: [v for part in parts for v in part[key]] for key in parts[0]}


def chat_entry(vocabulary: Vocabulary, token: int, logprob: float) -> dict:
    return {"token": vocabulary.text(token), "logprob": logprob, "bytes": list(vocabulary.bytes(token))}


def chat_content(vocabulary: Vocabulary, scores: list[TokenLogprob]) -> list[dict]:
    """The chat API's logprobs.content of the tokens of a reply."""
    return [
        {
            **chat_entry(vocabulary, s.token, s.logprob),
            "top_logprobs": [chat_entry(vocabulary, t, lp) for t, lp in s.top],
        }
        for s in scores
    ]
