"""Conversations: chats JSONL -> checked messages -> token ids and a mask of the reply tokens (cached) -> splits.

A chat corpus is one or more .jsonl files, one conversation a line, as OpenAI and Hugging Face datasets write them:
{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}. Each conversation is rendered with
the model's chat template and tokenized whole (chat.conversation_ids); the tokens of the assistant's replies, through
the end-of-turn token that closes each, are the ones training learns. The ids (the token dtype) and the mask (one
byte a token) are cached side by side as flat files, with the offset where each conversation starts, under a key of
the files' bytes and the tokenizer, as text corpora are. batching.py makes them batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from potion.config import DataConfig
from potion.data.chat import (
    CHATML,
    IM_END,
    IM_START,
    ChatTemplate,
    checked_messages,
    conversation_ids,
    template_for,
    tokenizer_has,
    turn_ends,
)
from potion.data.corpora import cache_root
from potion.data.sources import check_not_empty, corpus_key, find_files, publish_folder, remove_abandoned, token_dtype
from potion.data.tokenizer import Tokenizer, load_tokenizer, save_tokenizer, train_tokenizer
from potion.errors import PotionError

CHAT_SUFFIX = ".jsonl"
CACHE_FILES = ("ids.bin", "learned.bin", "offsets.bin", "tokenizer.json", "meta.json")
EXAMPLE = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'


def chat_files(files: list[Path]) -> bool:
    """Whether a corpus is conversations (every file .jsonl) rather than text; a mix of the two is refused."""
    chats = [p for p in files if p.suffix.lower() == CHAT_SUFFIX]
    if chats and len(chats) != len(files):
        text = next(p for p in files if p.suffix.lower() != CHAT_SUFFIX)
        raise PotionError(
            f"the data mixes conversations ('{chats[0]}') with text ('{text}'); train on one kind at a time: "
            "conversations are .jsonl files, text is anything else"
        )
    return bool(chats)


def is_chat_data(spec: str) -> bool:
    """Whether the data a run names (a path, a glob, a built-in name) is conversations."""
    return chat_files(check_not_empty(find_files(spec)))


def chat_ready(tokenizer: Tokenizer) -> Tokenizer:
    """tokenizer itself when it has a chat template (its own, or ChatML's two tokens); else a copy with ChatML's
    tokens added and ChatML as its template."""
    if tokenizer.chat_template is not None or all(tokenizer_has(tokenizer, t) for t in (IM_START, IM_END)):
        return tokenizer
    return tokenizer.with_chat_tokens()


# ---------------------------------------------------------------- reading and checking


def read_conversations(files: list[Path]) -> Iterator[tuple[str, list[dict]]]:
    """(where, messages) for every conversation of the files, in order; where is FILE:LINE. A line that is not a
    conversation with a reply is a PotionError naming it; blank lines are skipped."""
    for path in files:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                where = f"{path}:{number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise PotionError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
                if line.strip():
                    yield where, conversation_of(line, where)


def conversation_of(line: str, where: str) -> list[dict]:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as e:
        detail = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
        raise PotionError(f"{where}: not JSON ({detail}); each line is one conversation, {EXAMPLE}") from None
    if not isinstance(record, dict) or "messages" not in record:
        raise PotionError(f'{where}: no "messages"; each line is one conversation, {EXAMPLE}')
    messages = checked_messages(record["messages"], where)
    if not any(m["role"] == "assistant" for m in messages):
        raise PotionError(f"{where}: the conversation has no assistant turn, so it has no reply to learn")
    return messages


def end_of_turn_id(template: ChatTemplate, tokenizer: Tokenizer) -> int:
    """The token that closes a reply: the first end-of-turn marker of the template that is one token of the
    vocabulary (ChatML's <|im_end|>, Llama 3's <|eot_id|>, ...), else the end token."""
    for end in turn_ends(template):
        if tokenizer_has(tokenizer, end):
            return tokenizer.encode(end, source="a special token")[0]
    return tokenizer.eot_id


# ---------------------------------------------------------------- the cache


@dataclass
class ConversationFile:
    """Every conversation of a chat corpus as token ids and reply mask, in the cache."""

    folder: Path
    tokenizer: Tokenizer
    offsets: np.ndarray  # (n + 1,) int64: conversation i is tokens offsets[i]:offsets[i + 1]
    dtype: np.dtype

    def span(self) -> ConversationSpan:
        return ConversationSpan(self, 0, len(self.offsets) - 1)

    def split(self, val_fraction: float) -> tuple[ConversationSpan, ConversationSpan]:
        """The training conversations and the validation ones (the last val_fraction of them, at least one)."""
        n = len(self.offsets) - 1
        if n < 2:
            raise PotionError(
                f"the data has {n} conversation(s); training needs at least 2 (one is held out for validation)"
            )
        n_val = min(max(int(n * val_fraction), 1), n - 1)
        return ConversationSpan(self, 0, n - n_val), ConversationSpan(self, n - n_val, n)


class ConversationSpan:
    """Conversations start..stop of a ConversationFile, read when asked (os.pread, as token files are read)."""

    def __init__(self, source: ConversationFile, start: int, stop: int):
        self.tokenizer, self.dtype = source.tokenizer, source.dtype
        self.offsets = source.offsets[start : stop + 1]
        self.fds = [os.open(source.folder / name, os.O_RDONLY) for name in ("ids.bin", "learned.bin")]
        for fd in self.fds:
            weakref.finalize(self, os.close, fd)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1] - self.offsets[0])

    def conversation(self, i: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Conversation i's ids (int64) and reply mask (bool), its first `limit` tokens when given."""
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        n = stop - start if limit is None else min(stop - start, limit)
        ids = np.frombuffer(os.pread(self.fds[0], n * self.dtype.itemsize, start * self.dtype.itemsize), self.dtype)
        learned = np.frombuffer(os.pread(self.fds[1], n, start), np.uint8)
        return ids.astype(np.int64), learned.astype(bool)


def prepare_conversations(
    config: DataConfig, files: list[Path], tokenizer: Tokenizer | None, quiet: bool
) -> ConversationFile:
    """Tokenize the conversations (or reuse the cache). Without a tokenizer, one with ChatML's tokens is trained
    on them; a given one must have a chat template (setup adds ChatML's tokens to a model that has none)."""
    if tokenizer is None:
        tok_key = f"chat-{config.tokenizer}{config.bpe_vocab_size if config.tokenizer == 'bpe' else ''}"
    else:
        template_for(tokenizer)  # a model that cannot chat is refused before any work
        tok_key = hashlib.sha256(tokenizer.to_json().encode()).hexdigest()[:16]
    folder = cache_root() / "conversations" / f"{corpus_key(files)[:24]}-{tok_key}"
    if (folder / "meta.json").is_file():
        try:
            return open_conversations(folder, tokenizer)
        except (OSError, ValueError, KeyError, PotionError):
            shutil.rmtree(folder, ignore_errors=True)  # a damaged cache is rebuilt, never trusted
    if tokenizer is None:
        if not quiet and config.tokenizer == "bpe":
            print(f"potion: training a {config.tokenizer} tokenizer on {len(files)} file(s)", file=sys.stderr)
        texts = [text for _, text in rendered_texts(files)]  # every line checked before a tokenizer is trained
        tokenizer = train_tokenizer(config.tokenizer, lambda: iter(texts), config.bpe_vocab_size, chat=True)
    remove_abandoned(folder)
    write_conversations(folder, files, tokenizer)
    return open_conversations(folder, tokenizer)


def rendered_texts(files: list[Path]) -> Iterator[tuple[str, str]]:
    """(where, text) of every conversation in ChatML, without its two special tokens: what a new tokenizer learns
    its vocabulary from (the characters and words of the turns, their roles and newlines)."""
    template = ChatTemplate(CHATML)
    for where, messages in read_conversations(files):
        text = template.render(messages, add_generation_prompt=False)
        yield where, text.replace(IM_START, "").replace(IM_END, "")


def write_conversations(folder: Path, files: list[Path], tokenizer: Tokenizer) -> None:
    """Tokenize every conversation into a temporary folder and publish it as the cache entry; a bad line leaves
    nothing behind."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = tokenize_conversations(files, tokenizer, tmp)
        save_tokenizer(tokenizer, tmp / "tokenizer.json")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_folder(tmp, folder, CACHE_FILES)


def tokenize_conversations(files: list[Path], tokenizer: Tokenizer, out: Path) -> dict:
    template = template_for(tokenizer)
    end_id = end_of_turn_id(template, tokenizer)
    dtype = np.dtype(token_dtype(tokenizer.vocab_size))
    offsets, n_tokens, n_learned = [0], 0, 0
    with open(out / "ids.bin", "wb") as ids_file, open(out / "learned.bin", "wb") as learned_file:
        for where, messages in read_conversations(files):
            try:
                ids, learned = conversation_ids(template, tokenizer, messages, end_id)
            except PotionError as e:  # a character outside the vocabulary, a template that refuses the roles
                raise PotionError(f"{where}: {e}") from None
            np.asarray(ids, dtype=dtype).tofile(ids_file)
            np.asarray(learned, dtype=np.uint8).tofile(learned_file)
            n_tokens, n_learned = n_tokens + len(ids), n_learned + sum(learned)
            offsets.append(n_tokens)
    np.asarray(offsets, dtype=np.int64).tofile(out / "offsets.bin")
    if len(offsets) == 1:
        raise PotionError(f"the data ({', '.join(map(str, files[:3]))}) has no conversations, only blank lines")
    return {
        "n_conversations": len(offsets) - 1,
        "n_tokens": n_tokens,
        "n_learned": n_learned,
        "dtype": dtype.name,
        "files": [str(p) for p in files],
    }


def open_conversations(folder: Path, tokenizer: Tokenizer | None) -> ConversationFile:
    meta = json.loads((folder / "meta.json").read_text())
    tokenizer = tokenizer or load_tokenizer(folder / "tokenizer.json")
    dtype, n, n_tokens = np.dtype(meta["dtype"]), meta["n_conversations"], meta["n_tokens"]
    sizes = {"ids.bin": n_tokens * dtype.itemsize, "learned.bin": n_tokens, "offsets.bin": (n + 1) * 8}
    if any((folder / name).stat().st_size != size for name, size in sizes.items()):
        raise ValueError("a conversation file's size does not match its metadata")
    offsets = np.fromfile(folder / "offsets.bin", dtype=np.int64)
    if offsets[0] != 0 or offsets[-1] != n_tokens or np.any(np.diff(offsets) < 0):
        raise ValueError("the conversation offsets are damaged")
    return ConversationFile(folder, tokenizer, offsets, dtype)
