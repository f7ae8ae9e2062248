"""Tokenizers: text <-> token ids. Character-level or byte-level BPE, each saved as one JSON file.

Both have an end-of-text token that separates documents and tells generation to stop, and may carry the chat
template of the model they belong to (kept in the same JSON file, in tokenizer_config.json's fields). Trained for
conversations, they also have ChatML's <|im_start|> and <|im_end|> as single tokens, <|im_end|> ends a
generation, and ChatML is their template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from potion.data.chat import CHATML, IM_END, IM_START, ChatTemplate
from potion.errors import PotionError

EOT = "<|endoftext|>"
CHAT_TOKENS = (IM_START, IM_END)


class CharTokenizer:
    """One token per character of the training text, then the special tokens: end-of-text, and for conversations
    ChatML's two. `eot` is the one that ends a generation (end-of-text, or <|im_end|> for a chat model)."""

    kind = "char"

    def __init__(
        self,
        chars: Iterable[str],
        chat_template: ChatTemplate | None = None,
        specials: Iterable[str] = (EOT,),
        eot: str = EOT,
    ):
        self.chat_template = chat_template
        self.chars = sorted(set(chars))
        self.specials = list(specials)
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.special_ids = {s: len(self.chars) + k for k, s in enumerate(self.specials)}
        self.eot_token, self.eot_id = eot, self.special_ids[eot]
        self.vocab_size = len(self.chars) + len(self.specials)
        # ChatML's tokens are cut out of the text before the per-character lookup; end-of-text stays characters,
        # as it always has in a document
        split = [re.escape(s) for s in self.specials if s != EOT]
        self._special_split = re.compile(f"({'|'.join(split)})") if split else None
        # a code point -> id table makes encoding a numpy gather instead of a Python loop
        self._max_cp = max((ord(c) for c in self.chars), default=0)
        self._table = np.full(self._max_cp + 2, -1, dtype=np.int64)
        for c, i in self.index.items():
            self._table[ord(c)] = i

    @classmethod
    def train(cls, texts: Iterable[str], chat: bool = False) -> "CharTokenizer":
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        if not seen:
            raise PotionError("cannot build a character vocabulary from empty text")
        if chat:
            return cls(seen, ChatTemplate(CHATML), (EOT, *CHAT_TOKENS), eot=IM_END)
        return cls(seen)

    def with_chat_tokens(self) -> "CharTokenizer":
        """This vocabulary with ChatML's tokens after its own ids (which keep their numbers), and ChatML as its
        template."""
        specials = [*self.specials, *(s for s in CHAT_TOKENS if s not in self.specials)]
        return CharTokenizer(self.chars, ChatTemplate(CHATML), specials, self.eot_token)

    def encode(self, text: str, source: str = "text") -> list[int]:
        return self.encode_array(text, source).tolist()

    def encode_array(self, text: str, source: str = "text") -> np.ndarray:
        if self._special_split is None or not self._special_split.search(text):
            return self._encode_chars(text, source, 0)
        parts, offset = [], 0
        for piece in self._special_split.split(text):
            if piece in self.special_ids:
                parts.append(np.array([self.special_ids[piece]], dtype=np.int64))
            elif piece:
                parts.append(self._encode_chars(piece, source, offset, text))
            offset += len(piece)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _encode_chars(self, piece: str, source: str, offset: int, text: str | None = None) -> np.ndarray:
        """The ids of piece, a part of text starting at character `offset` (errors name its place in text)."""
        try:
            codes = np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        except UnicodeEncodeError as e:
            raise not_text(piece, e, source) from None
        codes_clipped = np.minimum(codes, self._max_cp + 1)  # anything above the table is unknown
        ids = self._table[codes_clipped]
        unknown = np.flatnonzero(ids < 0)
        if unknown.size:
            self._raise_unknown(piece if text is None else text, offset + int(unknown[0]), source)
        return ids

    def _raise_unknown(self, text: str, offset: int, source: str):
        line = text.count("\n", 0, offset) + 1
        column = offset - (text.rfind("\n", 0, offset) + 1) + 1
        ch = text[offset]
        raise PotionError(
            f"character {ch!r} (U+{ord(ch):04X}) in {source} at line {line}, column {column} is not in this "
            f"model's character vocabulary ({len(self.chars)} characters)"
        )

    def decode(self, ids: Iterable[int]) -> str:
        n = len(self.chars)
        return "".join(self.chars[i] if i < n else self.specials[min(i - n, len(self.specials) - 1)] for i in ids)

    def token_text(self, i: int) -> str:
        return self.decode([i])

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token stands for (the end token counts as one, like a separating newline; the other
        special tokens as the text they spell)."""
        specials = [1 if s == self.eot_token else len(s.encode("utf-8")) for s in self.specials]
        return np.array([len(c.encode("utf-8")) for c in self.chars] + specials, dtype=np.int64)

    def to_json(self) -> str:
        body = {"type": "potion-char", "eot": self.eot_token, "chars": self.chars}
        if self.specials != [EOT]:
            body["specials"] = self.specials
        body.update(template_fields(self.chat_template))
        return json.dumps(body, ensure_ascii=False)

    def to_hf_json(self) -> str:
        """The same vocabulary as a Hugging Face tokenizer.json: a BPE with no merges splits text into characters,
        each looked up as itself; the special tokens are special tokens; decoding joins the pieces as they are."""
        from tokenizers import AddedToken, decoders, models
        from tokenizers import Tokenizer as HFTokenizer

        vocab = {**self.index, **self.special_ids}
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        tk.decoder = decoders.Fuse()
        tk.add_special_tokens([AddedToken(s, special=True) for s in self.specials])
        return tk.to_str()


class BPETokenizer:
    """A tokenizer of the `tokenizers` library: potion's own byte-level BPE, or a Hugging Face model's.

    eot_token ends a document and a generation: potion's <|endoftext|>, or the end-of-sequence token of a model
    that names another (Llama 3's <|end_of_text|>, an instruct model's end of turn)."""

    kind = "bpe"

    def __init__(self, tk, eot_token: str = EOT, chat_template: ChatTemplate | None = None):
        self.tk, self.chat_template = tk, chat_template
        self.eot_token = eot_token
        self.eot_id = tk.token_to_id(eot_token)
        self.vocab_size = tk.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, chat: bool = False) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT, *CHAT_TOKENS] if chat else [EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
            show_progress=False,
        )
        tk.train_from_iterator(texts, trainer=trainer)
        return cls(tk, IM_END, ChatTemplate(CHATML)) if chat else cls(tk)

    def with_chat_tokens(self) -> "BPETokenizer":
        """This vocabulary with ChatML's tokens added as special tokens after its own ids, and ChatML as its
        template."""
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        tk = HFTokenizer.from_str(self.tk.to_str())  # a copy: the model this came from keeps its own
        tk.add_special_tokens([AddedToken(s, special=True) for s in CHAT_TOKENS if tk.token_to_id(s) is None])
        return BPETokenizer(tk, self.eot_token, ChatTemplate(CHATML))

    def encode(self, text: str, source: str = "text") -> list[int]:
        return self.tk.encode(checked_text(text, source), add_special_tokens=False).ids

    def encode_array(self, text: str, source: str = "text") -> np.ndarray:
        return np.asarray(self.encode(text, source), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def token_text(self, i: int) -> str:
        return self.decode([i])

    def token_byte_lengths(self) -> np.ndarray:
        from tokenizers import pre_tokenizers

        byte_of = {ch: b for b, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
        lengths = np.ones(self.vocab_size, dtype=np.int64)
        for token, i in self.tk.get_vocab().items():
            if token != self.eot_token:
                lengths[i] = len(token) if all(ch in byte_of for ch in token) else len(token.encode("utf-8"))
        return lengths

    def to_json(self) -> str:
        """A Hugging Face tokenizer.json; inside potion's own wrapper where the end token is not <|endoftext|> or
        there is a chat template (tokenizer.json has no field for either)."""
        if self.eot_token == EOT and self.chat_template is None:
            return self.tk.to_str()
        body = {"type": "potion-bpe", "eot": self.eot_token, "tokenizer": json.loads(self.tk.to_str())}
        body.update(template_fields(self.chat_template))
        return json.dumps(body, ensure_ascii=False)

    def to_hf_json(self) -> str:
        return self.tk.to_str()


Tokenizer = CharTokenizer | BPETokenizer


def template_fields(template: ChatTemplate | None) -> dict:
    return {"chat": template.to_config()} if template is not None else {}


def saved_template(d: dict, source: str) -> ChatTemplate | None:
    chat = d.get("chat")
    if chat is not None and not isinstance(chat, dict):
        raise PotionError(f'{source}: "chat" must be an object with a chat_template')
    return ChatTemplate.from_config(chat, source) if chat else None


def checked_text(text: str, source: str = "text") -> str:
    """text, once it is known to be Unicode that can be written out: a command-line argument whose bytes were
    not UTF-8 arrives with lone surrogates in it (\udcff for the byte 0xff), which no encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise not_text(text, e, source) from None
    return text


def not_text(text: str, e: UnicodeEncodeError, source: str) -> PotionError:
    return PotionError(
        f"{source} is not valid text: character {e.start + 1} ({text[e.start]!r}) is not Unicode (a byte that "
        "is not UTF-8, or half of a UTF-16 pair)"
    )


def train_tokenizer(kind: str, texts_factory, vocab_size: int = 4096, chat: bool = False) -> Tokenizer:
    """texts_factory() yields the corpus documents; called once. chat: with ChatML's tokens and template."""
    if kind == "char":
        return CharTokenizer.train(texts_factory(), chat)
    return BPETokenizer.train(texts_factory(), vocab_size, chat)


def tokenizer_from_json(text: str, source: str = "tokenizer.json") -> Tokenizer:
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested deeper than Python's stack
        raise PotionError(f"{source} is not valid JSON ({e}); the run directory may be damaged") from None
    if isinstance(d, dict) and d.get("type") == "potion-char":
        chars = checked_chars(d.get("chars"), source)
        specials, eot = checked_specials(d.get("specials", [EOT]), d.get("eot", EOT), chars, source)
        return CharTokenizer(chars, saved_template(d, source), specials, eot)
    if isinstance(d, dict) and d.get("type") == "potion-bpe" and isinstance(d.get("tokenizer"), dict):
        tokenizer = hf_tokenizer(json.dumps(d["tokenizer"]), d.get("eot"), source)
        tokenizer.chat_template = saved_template(d, source)
        return tokenizer
    if isinstance(d, dict) and isinstance(d.get("model"), dict):
        return hf_tokenizer(text, EOT, source)
    raise PotionError(f"{source} is not a potion tokenizer file")


def hf_tokenizer(text: str, eot_token, source: str) -> BPETokenizer:
    """A Hugging Face tokenizer.json, with eot_token (one of its tokens) ending documents and generations."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tk = HFTokenizer.from_str(text)
    except Exception as e:  # the library raises its own exception types
        raise PotionError(f"{source} is not a readable tokenizer: {e}") from None
    if not isinstance(eot_token, str) or tk.token_to_id(eot_token) is None:
        raise PotionError(f"{source} has no {eot_token} token to end a text with")
    return BPETokenizer(tk, eot_token)


def checked_chars(chars, source: str) -> list[str]:
    """A character vocabulary as saved: a non-empty list of distinct single characters."""
    if not isinstance(chars, list) or not chars:
        raise PotionError(f'{source} has no character vocabulary ("chars" must be a non-empty list)')
    seen = set()
    for c in chars:
        if not isinstance(c, str) or len(c) != 1:
            raise PotionError(f"{source}: the vocabulary entry {c!r} is not a single character")
        if c in seen:
            raise PotionError(f"{source}: the character {c!r} is in the vocabulary twice")
        seen.add(c)
    return chars


def checked_specials(specials, eot, chars: list[str], source: str) -> tuple[list[str], str]:
    """A character vocabulary's special tokens as saved: distinct strings longer than one character, among them
    the end token."""
    if not isinstance(specials, list) or not all(isinstance(s, str) and len(s) > 1 for s in specials):
        raise PotionError(f'{source}: "specials" must be a list of special tokens (strings of several characters)')
    if len(set(specials)) != len(specials):
        raise PotionError(f'{source}: a special token is in "specials" twice')
    if eot not in specials:
        raise PotionError(f"{source}: the end token {eot!r} is not one of its special tokens {specials}")
    return specials, eot


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    path.write_text(tok.to_json(), encoding="utf-8")


def load_tokenizer(path: Path) -> Tokenizer:
    if not path.is_file():
        raise PotionError(f"tokenizer file '{path}' is missing")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PotionError(f"tokenizer file '{path}' is damaged (not UTF-8 text: {e})") from None
    return tokenizer_from_json(text, str(path))
